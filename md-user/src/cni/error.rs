//! CNI error objects: a well-known code, a message and details, printed on stdout.

use serde_json::json;

use super::version::Version;

/// The spec's well-known error codes, and md's own (100 and up are plugin-specific).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    /// STATUS: the plugin cannot add containers now.
    NotAvailable = 50,
    /// CHECK: the attachment is not what ADD left (a veth, address, map entry or program is
    /// missing).
    Drift = 100,
    /// Anything else that failed.
    Internal = 999,
}

#[derive(Debug, Clone)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
    /// The version to answer in, once known.
    pub version: Option<Version>,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> CniError {
        CniError {
            code: code as u32,
            msg: msg.into(),
            details: String::new(),
            version: None,
        }
    }

    pub fn details(mut self, d: impl Into<String>) -> CniError {
        self.details = d.into();
        self
    }

    pub fn version(mut self, v: Version) -> CniError {
        self.version.get_or_insert(v);
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "cniVersion": self.version.unwrap_or(Version::LATEST).to_string(),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

impl From<anyhow::Error> for CniError {
    fn from(e: anyhow::Error) -> CniError {
        CniError::new(Code::Internal, crate::error::one_line(&e))
    }
}
