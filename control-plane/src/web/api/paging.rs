//! Cursor paging for the list endpoints (devices, rollouts, models, jobs, the audit log).
//!
//! A list is in a fixed order of a unique key. `?limit=` takes 1 to [`MAX_PAGE`] items (default
//! [`MAX_PAGE`]), and `?cursor=` starts after the key a previous page ended on. The body stays a JSON array, as
//! before paging; when more may follow, the response names the next page in `Link: <...>; rel="next"` (RFC
//! 8288, the request's own path and query with the new cursor) and its cursor in `X-Next-Cursor`. No such
//! header: the last page.

use crate::web::error::ApiError;
use axum::http::{HeaderName, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// The largest page, and the default.
pub const MAX_PAGE: usize = 1000;

/// The header that carries the next page's cursor.
pub const NEXT_CURSOR: &str = "x-next-cursor";

/// `limit` checked: 1 to [`MAX_PAGE`], default [`MAX_PAGE`].
pub fn limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let l = limit.unwrap_or(MAX_PAGE);
    if l == 0 || l > MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_PAGE}, got {l}")));
    }
    Ok(l)
}

/// A filter that takes one of a few words: `value`, if given, must be in `allowed`.
pub fn one_of(param: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !allowed.contains(&v) => {
            Err(ApiError::bad_request(format!("{param}: `{v}` is not one of {}", allowed.join(", "))))
        }
        _ => Ok(()),
    }
}

/// The items after `after` (by `key`, ascending), `limit` of them, and the key of the last one when more follow.
/// `items` must already be in ascending key order.
pub fn take<T, K: Ord>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
    after: Option<&K>,
    limit: usize,
) -> (Vec<T>, Option<K>) {
    let mut it = items.into_iter().filter(|t| after.is_none_or(|a| key(t) > *a)).peekable();
    let page: Vec<T> = it.by_ref().take(limit).collect();
    let next = if it.peek().is_some() { page.last().map(&key) } else { None };
    (page, next)
}

/// One page of a list: the array, and the next page's cursor in its headers.
pub struct Paged<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
    /// The request's address, for the `Link` header.
    pub uri: Uri,
}

/// `uri` with its `cursor` parameter set to `cursor` (other parameters kept, in their order).
fn with_cursor(uri: &Uri, cursor: &str) -> String {
    let mut query: Vec<String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("cursor="))
        .map(str::to_string)
        .collect();
    query.push(format!("cursor={}", encode(cursor)));
    format!("{}?{}", uri.path(), query.join("&"))
}

/// Percent-encodes what is not unreserved (RFC 3986).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl<T: Serialize> IntoResponse for Paged<T> {
    fn into_response(self) -> Response {
        let mut r = Json(self.items).into_response();
        if let Some(next) = &self.next {
            let link = format!("<{}>; rel=\"next\"", with_cursor(&self.uri, next));
            if let (Ok(link), Ok(cursor)) = (HeaderValue::from_str(&link), HeaderValue::from_str(next)) {
                r.headers_mut().insert(axum::http::header::LINK, link);
                r.headers_mut().insert(HeaderName::from_static(NEXT_CURSOR), cursor);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once_in_order() {
        let items: Vec<u32> = (1..=10).collect();
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let (page, next) = take(items.clone(), |x| *x, after.as_ref(), 3);
            seen.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, items);
        assert_eq!(take(items.clone(), |x| *x, None, 10), (items.clone(), None), "an exact fit has no next page");
        assert_eq!(take(items, |x| *x, Some(&42), 3), (vec![], None), "a cursor past the end");
    }

    #[test]
    fn the_link_keeps_the_filters_and_replaces_the_cursor() {
        let uri: Uri = "/api/v1/devices?class=air&cursor=a1&limit=2".parse().unwrap();
        assert_eq!(with_cursor(&uri, "b 2/3"), "/api/v1/devices?class=air&limit=2&cursor=b%202%2F3");
        assert!(limit(Some(0)).is_err() && limit(Some(1001)).is_err());
        assert_eq!(limit(None).unwrap(), MAX_PAGE);
    }
}
