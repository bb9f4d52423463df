//! The API's own description: OpenAPI 3.1, served at `GET /api/v1/openapi.json`.
//!
//! Nothing here lists the routes. Every handler carries a `#[utoipa::path]` with its method, path, parameters,
//! body and answers, naming the types it really takes and returns, and [`crate::web::router`] registers it
//! with `utoipa_axum::routes!`, which adds it to the router and to the document at once: a route cannot be
//! served without being described, nor described at another path or method than it is served at. What the
//! operations share comes from where they stand in the router, added here: the role a group needs (a bearer
//! token, with its 401 and 403 answers), 400 for an operation that takes input, 413 for one with a body.

use crate::access::operators::Role;
use crate::web::error::ErrorBody;
use crate::web::AppState;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, ResponseBuilder};
use utoipa::{PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;

/// Where the document is served (no token needed: it describes the API, not the fleet).
pub const PATH: &str = "/api/v1/openapi.json";

/// A file's bytes, as a body (an artifact, a bundle, an agent binary).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct Binary(Vec<u8>);

/// The security scheme every guarded operation names.
const BEARER: &str = "bearer";

/// The document's frame: what the API is, its version, and the bearer-token scheme.
pub fn frame() -> OpenApi {
    let info = InfoBuilder::new()
        .title("edgeloop control plane")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The operator API of the edgeloop control plane: the fleet and its telemetry, device logs, training \
             jobs and models, signed rollouts, class configurations, agent builds, enrollment and the audit log. \
             Lists page with `limit` and `cursor`: when more follow, the response carries the next page's \
             cursor in `X-Next-Cursor` and its address in `Link: <...>; rel=\"next\"`. Every error is a JSON \
             `{error, detail}`. Tokens are made with `edgeloop-control-plane token create --role ROLE`.",
        ))
        .build();
    let bearer = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .description(Some("An operator token: viewer (reads), operator (changes), or admin (identity)."))
        .build();
    let components = ComponentsBuilder::new()
        .schema(ErrorBody::name(), ErrorBody::schema())
        .security_scheme(BEARER, SecurityScheme::Http(bearer))
        .build();
    OpenApiBuilder::new().info(info).components(Some(components)).build()
}

/// The operations of one path.
fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
        item.head.as_mut(),
        item.options.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// Adds an error answer (`{error, detail}`) to `op` unless it has its own for `status`.
fn error_answer(op: &mut Operation, status: &str, description: &str) {
    if op.responses.responses.contains_key(status) {
        return;
    }
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name(ErrorBody::name()))).build();
    let answer = ResponseBuilder::new().description(description).content("application/json", content).build();
    op.responses.responses.insert(status.to_string(), answer.into());
}

/// Marks every operation of a group of routes as needing `role`: the bearer scheme, 401 and 403, and the
/// role named in its description.
pub fn guarded(mut group: OpenApiRouter<AppState>, role: Role) -> OpenApiRouter<AppState> {
    for item in group.get_openapi_mut().paths.paths.values_mut() {
        for op in operations(item) {
            op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            error_answer(op, "401", "No valid token: send `Authorization: Bearer <token>`.");
            error_answer(op, "403", &format!("The token's role is below `{role}`."));
            let needs = format!("Needs the `{role}` role.");
            op.description = Some(match op.description.take() {
                Some(d) if !d.is_empty() => format!("{d}\n\n{needs}"),
                _ => needs,
            });
        }
    }
    group
}

/// Adds what every operation shares: 400 where it takes parameters or a body, 413 where it takes a body; and
/// opens the flattened parts of a composed schema ([`open_flattened`]).
pub fn complete(doc: &mut OpenApi) {
    open_flattened(doc);
    for item in doc.paths.paths.values_mut() {
        for op in operations(item) {
            let input = op.parameters.as_ref().is_some_and(|p| !p.is_empty()) || op.request_body.is_some();
            if input {
                error_answer(op, "400", "The request is malformed; `detail` names what was wrong and where.");
            }
            if op.request_body.is_some() {
                error_answer(op, "413", "The body is over the operation's size limit.");
            }
        }
    }
}

/// A type that refuses unknown fields (`#[serde(deny_unknown_fields)]`, as request bodies do) has
/// `additionalProperties: false` in its schema. Where a view flattens it beside fields of its own (a stage
/// with its status, a window with whether it is open now), the view's schema is `allOf` of the two, and that
/// `false` would refuse the view's own fields. Such a part is inlined without it; the type's own schema,
/// used by requests, keeps it.
fn open_flattened(doc: &mut OpenApi) {
    let Ok(mut v) = serde_json::to_value(&*doc) else { return };
    let schemas = v["components"]["schemas"].as_object().cloned().unwrap_or_default();
    fn walk(node: &mut serde_json::Value, schemas: &serde_json::Map<String, serde_json::Value>) {
        match node {
            serde_json::Value::Object(o) => {
                if let Some(serde_json::Value::Array(parts)) = o.get_mut("allOf") {
                    for part in parts.iter_mut() {
                        let name = part
                            .get("$ref")
                            .and_then(|r| r.as_str())
                            .and_then(|r| r.strip_prefix("#/components/schemas/"));
                        if let Some(mut inlined) = name.and_then(|n| schemas.get(n)).cloned() {
                            if inlined.get("additionalProperties") == Some(&serde_json::Value::Bool(false)) {
                                if let Some(i) = inlined.as_object_mut() {
                                    i.remove("additionalProperties");
                                }
                                *part = inlined;
                            }
                        }
                    }
                }
                o.values_mut().for_each(|child| walk(child, schemas));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|child| walk(child, schemas)),
            _ => {}
        }
    }
    walk(&mut v, &schemas);
    if let Ok(opened) = serde_json::from_value(v) {
        *doc = opened;
    }
}
