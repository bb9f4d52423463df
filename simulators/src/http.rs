//! A client of the operator API for tests, the demo and tools: [`Api`], a reqwest client bound to one control
//! plane, with the CA it trusts and the bearer token it sends. Each client owns its state: two clients of
//! the same address (a port reused by another test's control plane) share nothing.

use anyhow::Context;
use std::net::SocketAddr;

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

/// The operator API of one control plane: `http://` or `https://` (trusting only a given CA), and the bearer
/// token sent with every request that does not set its own `Authorization` header.
///
/// Redirects are not followed (a test sees the 303 itself), no proxy is used, and each request has a
/// connection of its own, closed after the response (a control plane restarted on the same port finds no
/// stale connection to it, and idle-connection limits see only the connections a test opens).
#[derive(Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("base", &self.base).field("token", &self.token.as_ref().map(|_| "…")).finish()
    }
}

fn builder() -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::CONNECTION, reqwest::header::HeaderValue::from_static("close"));
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(0)
        .default_headers(headers)
        .tls_built_in_root_certs(false)
}

impl Api {
    /// Plain HTTP to `addr`.
    pub fn new(addr: SocketAddr) -> Api {
        // Building fails only when the TLS backend cannot start, which a plain client does not need.
        let client = builder().build().expect("a plain HTTP client builds");
        Api { base: format!("http://{addr}"), client, token: None }
    }

    /// HTTPS to `addr`, trusting only the CA in `ca_pem`.
    pub fn tls(addr: SocketAddr, ca_pem: &[u8]) -> anyhow::Result<Api> {
        let cfg = edgeloop_common::tls::client_config(ca_pem)?;
        let client = builder().use_preconfigured_tls(cfg).build().context("building the HTTPS client")?;
        Ok(Api { base: format!("https://{addr}"), client, token: None })
    }

    /// Plain HTTP to an in-process control plane, with the admin token it created on its first start, if it
    /// did.
    pub fn of(cp: &edgeloop_control_plane::ControlPlaneHandle) -> Api {
        let api = Api::new(cp.api_addr);
        match &cp.admin_token {
            Some(t) => api.with_token(t),
            None => api,
        }
    }

    /// Sends `token` (surrounding whitespace trimmed, as read from a file) as the bearer token.
    pub fn with_token(mut self, token: &str) -> Api {
        self.token = Some(token.trim().to_string());
        self
    }

    /// `http://host:port` or `https://host:port`, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends one request. `body` is sent as JSON when present. An `Authorization` header in `headers`
    /// replaces the client's token.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response> {
        let url = format!("{}{path}", self.base);
        let m = reqwest::Method::from_bytes(method.as_bytes()).with_context(|| format!("method {method}"))?;
        let mut req = self.client.request(m, &url);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        if let Some(t) = &self.token {
            if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("authorization")) {
                req = req.bearer_auth(t);
            }
        }
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b.to_vec());
        }
        let r = req.send().await.map_err(|e| {
            let what = if e.is_connect() && url.starts_with("https:") {
                format!("connecting to {} (TLS)", self.base)
            } else {
                format!("{method} {url}")
            };
            anyhow::Error::new(e).context(what)
        })?;
        let status = r.status().as_u16();
        let headers = r
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).trim().to_string()))
            .collect();
        let body = r.bytes().await.with_context(|| format!("{method} {url}: reading the body"))?.to_vec();
        Ok(Response { status, headers, body })
    }

    /// Sends `GET path` and returns the status code and body text.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let r = self.request("GET", path, &[], None).await?;
        Ok((r.status, r.text()))
    }

    /// GET and parse JSON, failing on a non-2xx status.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.get(path).await?;
        anyhow::ensure!((200..300).contains(&status), "GET {path}: status {status}: {body}");
        serde_json::from_str(&body).with_context(|| format!("GET {path}: body is not the expected JSON"))
    }

    /// POSTs a JSON value; returns the status and body text.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<(u16, String)> {
        let r = self.request("POST", path, &[], Some(body.to_string().as_bytes())).await?;
        Ok((r.status, r.text()))
    }
}
