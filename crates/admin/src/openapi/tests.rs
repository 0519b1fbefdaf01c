//! The document against the router, against docs/api.md, and against what
//! the handlers really send, over real sockets.

use std::collections::BTreeSet;

use hongbao_core::ids::{make_packet_id, SEQUENCE_MAX};
use hongbao_core::limits::SHARDS_MAX;
use hongbao_core::sets::SETS_MAX;
use hongbao_core::ID_MAX;
use hongbao_proto::ErrorCode;
use serde_json::{json, Value};

use crate::tests::{api, Api, Resp, KEY};

fn doc() -> Value {
    serde_json::to_value(super::document()).unwrap()
}

/// The methods a path item holds, upper-case.
fn methods_of(item: &Value) -> BTreeSet<String> {
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    METHODS.iter().filter(|m| item.get(**m).is_some()).map(|m| m.to_uppercase()).collect()
}

/// Every `(METHOD, path)` of a document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().unwrap();
    paths.iter().flat_map(|(path, item)| methods_of(item).into_iter().map(move |m| (m, path.clone()))).collect()
}

/// A path to request for a pattern: every `{param}` is 1.
fn concrete(pattern: &str) -> String {
    pattern.split('/').map(|seg| if seg.starts_with('{') { "1" } else { seg }).collect::<Vec<_>>().join("/")
}

#[test]
fn the_document_is_openapi_3_1_with_every_line_of_the_route_table() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut from_table = BTreeSet::new();
    let mut lines = 0;
    for (_, paths, _) in crate::route_table() {
        for (path, item) in paths.paths {
            for method in methods_of(&serde_json::to_value(item).unwrap()) {
                lines += 1;
                from_table.insert((method, path.clone()));
            }
        }
    }
    assert_eq!(from_table.len(), lines, "an operation is listed twice in route_table");
    assert_eq!(from_table, operations(&doc));
}

/// The router answers every documented method of a path from its handler,
/// and any other method with a 405 whose `Allow` (the router's own list of
/// what it has on that path) is exactly the documented methods.
#[tokio::test]
async fn the_router_serves_exactly_the_documented_methods_of_each_path() {
    let api = api(Some(KEY)).await;
    let doc = doc();
    for (pattern, item) in doc["paths"].as_object().unwrap() {
        let path = concrete(pattern);
        let documented = methods_of(item);
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            // No key: a `/v1` handler's guard answers 401, so nothing moves.
            let r = api.raw(method, &path, &[], "").await;
            if documented.contains(method) {
                let expected = if crate::needs_key(pattern) { 401 } else { 200 };
                assert_eq!(r.status, expected, "{method} {path}: {}", r.text);
            } else {
                assert_eq!(r.status, 405, "{method} {path} is served but not documented: {}", r.text);
                let allow: BTreeSet<String> =
                    r.header("allow").unwrap_or_default().split(',').map(|m| m.trim().to_owned()).collect();
                let mut expected = documented.clone();
                if expected.contains("GET") {
                    expected.insert("HEAD".to_owned());
                }
                assert_eq!(allow, expected, "{path}: the router's methods are not the document's");
            }
        }
    }
}

/// docs/api.md's route table names exactly the operations of the document:
/// a route documented here and not there fails, and so does one listed
/// there that the router (hence the document) lacks. A `…/x` entry repeats
/// the method and path of the entry before it with the last segment
/// replaced.
#[test]
fn the_route_table_of_docs_api_md_is_the_documents() {
    let api_md = include_str!("../../../../docs/api.md");
    let table = api_md
        .lines()
        .skip_while(|l| !l.starts_with("| route |"))
        .take_while(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!table.is_empty(), "no `| route | purpose |` table in docs/api.md");
    let mut listed = BTreeSet::new();
    let mut previous: Option<(String, String)> = None;
    for entry in table.split('`').skip(1).step_by(2) {
        let (method, path) = if let Some(tail) = entry.strip_prefix("…/") {
            let (method, path) = previous.clone().unwrap_or_else(|| panic!("`{entry}` follows no route"));
            (method, format!("{}/{tail}", path.rsplit_once('/').unwrap().0))
        } else {
            let Some((method, path)) = entry.split_once(' ') else { continue };
            (method.to_owned(), path.to_owned())
        };
        previous = Some((method.clone(), path.clone()));
        listed.insert((method, path));
    }
    let documented = operations(&doc());
    let missing: Vec<_> = documented.difference(&listed).collect();
    assert!(missing.is_empty(), "in the document but not in docs/api.md's route table: {missing:?}");
    let unserved: Vec<_> = listed.difference(&documented).collect();
    assert!(unserved.is_empty(), "in docs/api.md's route table but not in the document: {unserved:?}");
}

#[test]
fn v1_needs_the_key_and_every_error_has_the_error_body() {
    let doc = doc();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(
        schemes["bearer"],
        json!({"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]})
    );
    assert_eq!((&schemes["api_key"]["type"], &schemes["api_key"]["in"]), (&json!("apiKey"), &json!("header")));
    assert_eq!(schemes["api_key"]["name"], "x-api-key");
    for (method, path) in operations(&doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        let what = format!("{method} {path}");
        let responses = op["responses"].as_object().unwrap();
        if crate::needs_key(&path) {
            assert_eq!(op["security"], json!([{"bearer": []}, {"api_key": []}]), "{what}");
            for status in ["401", "500"] {
                assert!(responses.contains_key(status), "{what}: no {status}");
            }
        } else {
            assert!(op.get("security").is_none(), "{what} needs no key");
        }
        if op.get("requestBody").is_some() {
            for status in ["400", "408", "413"] {
                assert!(responses.contains_key(status), "{what}: no {status}");
            }
        }
        for (status, response) in responses {
            let json_schema = &response["content"]["application/json"]["schema"]["$ref"];
            if status.starts_with('2') || (path == "/health" && status == "503") {
                continue;
            }
            assert_eq!(json_schema, "#/components/schemas/ErrorBody", "{what} {status}");
        }
    }
}

#[test]
fn ids_in_paths_are_integers_with_the_ranges_the_handlers_check() {
    let packet_id_max = make_packet_id(SETS_MAX - 1, (SHARDS_MAX - 1) as u16, SEQUENCE_MAX);
    assert_eq!(packet_id_max, (1 << 53) - 1, "docs/api.md: packet ids are below 2^53");
    let doc = doc();
    let mut seen = 0;
    for (method, path) in operations(&doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let names: Vec<&str> = params.iter().map(|p| p["name"].as_str().unwrap()).collect();
        let expected: Vec<&str> = path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')).collect();
        assert_eq!(names, expected, "{method} {path}");
        for p in &params {
            seen += 1;
            assert_eq!((p["in"].as_str(), p["required"].as_bool()), (Some("path"), Some(true)), "{method} {path}");
            let (min, max) = if path.starts_with("/v1/packets/") { (0, packet_id_max) } else { (1, ID_MAX) };
            assert_eq!(
                (&p["schema"]["type"], &p["schema"]["minimum"], &p["schema"]["maximum"]),
                (&json!("integer"), &json!(min), &json!(max)),
                "{method} {path}"
            );
            assert!(op["responses"].get("400").is_some(), "{method} {path}: an id that is not a number is a 400");
        }
    }
    assert!(seen >= 12, "path parameters not found ({seen})");
}

#[test]
fn the_error_codes_of_the_document_are_the_wire_names() {
    let doc = doc();
    let codes = doc["components"]["schemas"]["ErrorCode"]["enum"].as_array().unwrap();
    assert_eq!(codes.len(), 20);
    for code in codes {
        let parsed: ErrorCode = serde_json::from_value(code.clone()).unwrap();
        assert_eq!(parsed.as_str(), code.as_str().unwrap());
    }
}

#[tokio::test]
async fn openapi_json_is_served_without_a_key() {
    let api = api(Some(KEY)).await;
    let r = api.raw("GET", "/openapi.json", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, doc());
}

// ---- bodies against their schemas ----------------------------------------

/// Checks `value` against `schema`, for the part of JSON Schema the
/// document uses: `$ref`, `oneOf`, `type` (one or a list with `null`),
/// `enum`, objects (`properties`, `required`, `additionalProperties:
/// false`), arrays (`items`, `maxItems`), bounds on numbers and lengths.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.strip_prefix("#/components/schemas/").ok_or(format!("{at}: ref {r}"))?;
        return conforms(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let fits = options.iter().filter(|o| conforms(doc, o, value, at).is_ok()).count();
        return if fits == 1 { Ok(()) } else { Err(format!("{at}: {value} fits {fits} of oneOf")) };
    }
    if let Some(values) = schema["enum"].as_array() {
        if !values.contains(value) {
            return Err(format!("{at}: {value} not in {values:?}"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return Err(format!("{at}: schema without a type: {schema}")),
    };
    let type_of = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if !types.contains(&type_of) {
        return Err(format!("{at}: {value} is {type_of}, the schema says {types:?}"));
    }
    let above = |bound: &str, v: f64| schema[bound].as_f64().is_some_and(|b| v > b);
    let below = |bound: &str, v: f64| schema[bound].as_f64().is_some_and(|b| v < b);
    match value {
        Value::Number(n) => {
            let v = n.as_f64().unwrap();
            if above("maximum", v) || below("minimum", v) {
                return Err(format!("{at}: {v} out of the schema's range"));
            }
        }
        Value::String(s) => {
            let chars = s.chars().count() as f64;
            if above("maxLength", chars) || below("minLength", chars) {
                return Err(format!("{at}: {s:?} of the wrong length"));
            }
        }
        Value::Array(items) => {
            if above("maxItems", items.len() as f64) {
                return Err(format!("{at}: too many items"));
            }
            for (i, item) in items.iter().enumerate() {
                conforms(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        Value::Object(fields) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                if !fields.contains_key(required.as_str().unwrap()) {
                    return Err(format!("{at}: {required} missing from {value}"));
                }
            }
            for (name, field) in fields {
                match schema["properties"].get(name) {
                    Some(s) => conforms(doc, s, field, &format!("{at}.{name}"))?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{at}: {name} is not in the schema"))
                    }
                    None => {}
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Calls the API and checks the request body and the answer against the
/// document: the request against its `requestBody`, the answer's status
/// against the listed ones and its body against that status's schema.
async fn checked(api: &Api, doc: &Value, method: &str, pattern: &str, path: &str, body: Option<Value>) -> Resp {
    let op = &doc["paths"][pattern][method.to_lowercase()];
    assert!(op.is_object(), "{method} {pattern} is not in the document");
    if let Some(body) = &body {
        let schema = &op["requestBody"]["content"]["application/json"]["schema"];
        conforms(doc, schema, body, "request").unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    }
    let r = api.call(method, path, body).await;
    let response = &op["responses"][r.status.to_string()];
    assert!(response.is_object(), "{method} {path}: status {} is not documented: {}", r.status, r.text);
    let schema = &response["content"]["application/json"]["schema"];
    conforms(doc, schema, &r.body, "response")
        .unwrap_or_else(|e| panic!("{method} {path} {}: {e}\n{}", r.status, r.text));
    r
}

#[tokio::test]
async fn every_body_the_api_sends_matches_its_schema() {
    let api = api(Some(KEY)).await;
    let doc = doc();
    let d = &doc;
    let deposit = json!({"amount_fen": 100_000, "key": "dep-1"});
    checked(&api, d, "POST", "/v1/accounts/{user}/deposit", "/v1/accounts/1/deposit", Some(deposit)).await;
    let withdraw = json!({"amount_fen": 10, "key": "w-1"});
    checked(&api, d, "POST", "/v1/accounts/{user}/withdraw", "/v1/accounts/1/withdraw", Some(withdraw)).await;
    let r = checked(&api, d, "GET", "/v1/accounts/{user}", "/v1/accounts/1", None).await;
    // The shapes docs/api.md shows, byte for byte.
    assert_eq!(r.text, r#"{"balance_fen":99990,"user":1}"#);

    let r = checked(&api, d, "PUT", "/v1/groups/{id}", "/v1/groups/9", Some(json!({"members": [1, 2, 3]}))).await;
    assert_eq!(r.text, r#"{"group":9,"members":[1,2,3]}"#);
    let change = json!({"add": [4], "remove": [3]});
    checked(&api, d, "POST", "/v1/groups/{id}/members", "/v1/groups/9/members", Some(change)).await;
    checked(&api, d, "GET", "/v1/groups/{id}", "/v1/groups/9", None).await;
    checked(&api, d, "GET", "/v1/groups/{id}", "/v1/groups/10", None).await;

    let send = json!({"sender": 1, "amount_fen": 300, "count": 3, "kind": "lucky", "to": {"group": 9},
                      "greeting": "恭喜发财", "key": "s-1"});
    let r = checked(&api, d, "POST", "/v1/packets", "/v1/packets", Some(send)).await;
    let packet = r.body["packet"].as_u64().unwrap();
    let expires_ms = &r.body["expires_ms"];
    assert_eq!(
        r.text,
        format!(r#"{{"amount_fen":300,"count":3,"expires_ms":{expires_ms},"packet":{packet},"repeat":false}}"#)
    );
    checked(&api, d, "GET", "/v1/packets/{id}", &format!("/v1/packets/{packet}"), None).await;
    checked(&api, d, "GET", "/v1/packets/{id}", "/v1/packets/5", None).await;
    let broke = json!({"sender": 7, "amount_fen": 300, "count": 1, "kind": "fixed", "to": {"user": 1}, "key": "s-2"});
    checked(&api, d, "POST", "/v1/packets", "/v1/packets", Some(broke)).await;
    let stranger =
        json!({"sender": 1, "amount_fen": 3, "count": 1, "kind": "fixed", "to": {"users": [2]}, "key": "s-3"});
    checked(&api, d, "POST", "/v1/packets", "/v1/packets", Some(stranger)).await;

    let campaign = json!({"funder": 1, "total_fen": 1000, "rule": {"range": {"min_fen": 1, "max_fen": 10}},
                          "rate_per_s": 5, "win_cap_per_user": null, "key": "c-1"});
    let r = checked(&api, d, "POST", "/v1/campaigns", "/v1/campaigns", Some(campaign)).await;
    let id = r.body["id"].as_u64().unwrap();
    let one = format!("/v1/campaigns/{id}");
    checked(&api, d, "POST", "/v1/campaigns/{id}/start", &format!("{one}/start"), None).await;
    checked(&api, d, "GET", "/v1/campaigns/{id}", &one, None).await;
    checked(&api, d, "GET", "/v1/campaigns", "/v1/campaigns", None).await;
    checked(&api, d, "POST", "/v1/campaigns/{id}/stop", &format!("{one}/stop"), None).await;
    checked(&api, d, "POST", "/v1/campaigns/{id}/start", &format!("{one}/start"), None).await;
    checked(&api, d, "GET", "/v1/campaigns/{id}", "/v1/campaigns/99", None).await;

    let push = json!({"target": {"users": [1, 2]}, "persistent": true, "topic": "t", "text": "hi"});
    checked(&api, d, "POST", "/v1/push", "/v1/push", Some(push)).await;
    let r = checked(&api, d, "POST", "/v1/broadcast", "/v1/broadcast", Some(json!({"topic": "t", "text": "x"}))).await;
    let task = format!("/v1/tasks/{}", r.body["id"]);
    checked(&api, d, "GET", "/v1/tasks/{id}", &task, None).await;
    checked(&api, d, "POST", "/v1/tasks/{id}/stop", &format!("{task}/stop"), None).await;
    checked(&api, d, "GET", "/v1/tasks", "/v1/tasks", None).await;
    checked(&api, d, "GET", "/v1/tasks/{id}", "/v1/tasks/77", None).await;

    let r = checked(&api, d, "POST", "/v1/tokens", "/v1/tokens", Some(json!({"user": 42, "ttl_s": 60}))).await;
    let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["expires_s", "token", "user"]);
    checked(&api, d, "GET", "/v1/stats", "/v1/stats", None).await;
    let r = checked(&api, d, "GET", "/health", "/health", None).await;
    assert_eq!(r.text, r#"{"status":"ok"}"#);

    // Answers that are not the handler's: a bad path id, a bad body.
    checked(&api, d, "GET", "/v1/packets/{id}", "/v1/packets/x", None).await;
    checked(&api, d, "POST", "/v1/tokens", "/v1/tokens", None).await;
}

/// The examples the document shows (docs/api.md's) fit their own schemas.
#[test]
fn the_examples_fit_their_schemas() {
    let doc = doc();
    let mut seen = 0;
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        if let Some(example) = schema.get("example").or_else(|| schema["examples"].get(0)) {
            seen += 1;
            conforms(&doc, schema, example, name).unwrap();
        }
    }
    assert_eq!(seen, 8, "one example per request body");
}
