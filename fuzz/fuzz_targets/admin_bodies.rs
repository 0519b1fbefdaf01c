//! The admin API's JSON request bodies (crates/admin/src/routes.rs), parsed
//! exactly as the handlers parse them (`ApiJson` → `parse_json`), then put
//! through the checks each handler makes before it calls the engine.
//!
//! Input: one byte choosing the route's body type, then the body. Checked:
//! - a body that does not parse is a 400 `invalid_request`, never anything
//!   else (no panic, no 500);
//! - a body that parses is JSON (UTF-8 throughout), and its fields written back as JSON parse
//!   to the same fields (nothing is lost or invented on the way in);
//! - the handler's own checks (user ids, token lifetime, the campaign spec)
//!   run on any parsed body without panicking.
#![no_main]

use hongbao_admin::fuzz::{parse, Body};
use hongbao_proto::ErrorCode;
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;

fuzz_target!(|data: &[u8]| {
    let [which, bytes @ ..] = data else { return };
    let body = Body::ALL[usize::from(*which) % Body::ALL.len()];
    match parse(body, bytes) {
        Ok(parsed) => {
            // JSON: UTF-8 text of the JSON grammar. (Not `Value`: it also
            // refuses numbers past f64's range, which JSON allows.)
            let text = std::str::from_utf8(bytes).expect("a body taken is UTF-8");
            assert!(serde_json::from_str::<IgnoredAny>(text).is_ok(), "{body:?} took a body that is not JSON");
            let again = serde_json::to_vec(&parsed.fields).unwrap();
            let back =
                parse(body, &again).unwrap_or_else(|e| panic!("{body:?} fields written back do not parse: {e:?}"));
            assert_eq!(back.fields, parsed.fields, "{body:?} fields changed on the way back");
            assert_eq!(back.checked, parsed.checked);
        }
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400, "{body:?}: {e:?}");
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{body:?}: {e:?}");
        }
    }
});
