//! Schemas for the admin API's OpenAPI document (feature `openapi`) that no
//! type of ours derives: what `#[schema(value_type = ...)]` points at where a
//! field's Rust type says less than the API checks.

use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::RefOr;

/// A user or group id as a request carries it: 1 to `ID_MAX` (2^53 - 1).
pub struct Id;

impl utoipa::PartialSchema for Id {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1))
            .maximum(Some(crate::ID_MAX))
            .description(Some("A user or group id, 1 to 2^53 - 1 (it survives a JavaScript number)."))
            .into()
    }
}

impl utoipa::ToSchema for Id {}
