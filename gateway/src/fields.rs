//! Reading a JSON request field by field, so that every wrong type gets an OpenAI-style message
//! that names the field (`param`), rather than serde's "invalid type at line 1 column 42".
use serde_json::{Map, Value};

use crate::error::ApiError;

/// How a JSON value's type reads in a message ("a string", "an array"...).
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid_param(
        param,
        format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            type_name(got)
        ),
    )
}

/// The fields of a JSON object. A field that is absent or `null` reads as `None`, as OpenAI
/// treats an explicit `null` as "not set".
pub(crate) struct Fields<'a>(pub(crate) &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(key, "a string", v)),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(key, "a boolean", v)),
        }
    }

    pub(crate) fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(wrong_type(key, "a number", v)),
        }
    }

    /// An integer; out-of-range values saturate (a limit check then rejects them with a message
    /// about the value rather than about its type).
    pub(crate) fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i))
                } else if n.as_u64().is_some() {
                    Ok(Some(i64::MAX))
                } else {
                    Err(ApiError::invalid_param(
                        key,
                        format!(
                            "Invalid type for '{key}': expected an integer, but got a decimal number instead."
                        ),
                    ))
                }
            }
            Some(v) => Err(wrong_type(key, "an integer", v)),
        }
    }

    /// A string or an array of strings (`stop`).
    pub(crate) fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong_type(&format!("{key}[{i}]"), "a string", other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(wrong_type(key, "a string or an array of strings", v)),
        }
    }

    pub(crate) fn object(&self, key: &str) -> Result<Option<Fields<'a>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Fields(m))),
            Some(v) => Err(wrong_type(key, "an object", v)),
        }
    }
}

/// Parses a request body into its top-level object: malformed JSON and a non-object body are 400s.
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::invalid(format!(
            "The request body must be a JSON object, but it is {}.",
            type_name(&other)
        ))),
        Err(e) => Err(ApiError::invalid(format!(
            "We could not parse the JSON body of your request: {e}. Make sure the body is valid JSON."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn null_is_absent_and_types_are_checked() {
        let m = obj(json!({"a": null, "b": "x", "c": 3, "d": 2.5, "e": [1]}));
        let f = Fields(&m);
        assert_eq!(f.int("a").unwrap(), None);
        assert_eq!(f.int("c").unwrap(), Some(3));
        assert_eq!(f.number("d").unwrap(), Some(2.5));
        let e = f.int("b").unwrap_err();
        assert_eq!(
            e.message,
            "Invalid type for 'b': expected an integer, but got a string instead."
        );
        assert_eq!(e.param.as_deref(), Some("b"));
        assert!(f.int("d").is_err());
        let e = f.strings("e").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("e[0]"));
    }

    #[test]
    fn body_must_be_a_json_object() {
        assert!(parse_object(b"{\"a\":1}").is_ok());
        let e = parse_object(b"[1]").unwrap_err();
        assert_eq!(
            e.message,
            "The request body must be a JSON object, but it is an array."
        );
        let e = parse_object(b"{\"a\":").unwrap_err();
        assert!(
            e.message.starts_with("We could not parse the JSON body"),
            "{}",
            e.message
        );
        assert_eq!(e.status.as_u16(), 400);
    }
}
