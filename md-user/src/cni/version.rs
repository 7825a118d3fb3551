//! `cniVersion` negotiation: the plugin answers in the configuration's version, and only
//! versions it can speak are accepted.

use std::fmt;

use super::error::{CniError, Code};

/// A CNI spec version md speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

/// Oldest first. 0.3.0 brought the result format md returns (interfaces, ips, routes, dns).
pub const SUPPORTED: &[Version] = &[
    Version(0, 3, 0),
    Version(0, 3, 1),
    Version(0, 4, 0),
    Version(1, 0, 0),
    Version(1, 1, 0),
];

impl Version {
    pub const LATEST: Version = Version(1, 1, 0);

    /// The version a configuration asks for, if md speaks it (code 1 otherwise).
    pub fn negotiate(s: &str) -> Result<Version, CniError> {
        SUPPORTED
            .iter()
            .copied()
            .find(|v| v.to_string() == s)
            .ok_or_else(|| {
                CniError::new(
                    Code::IncompatibleVersion,
                    format!("incompatible CNI version {s:?}"),
                )
                .details(format!("md supports {}", supported_list().join(", ")))
            })
    }

    /// Refuses a verb the version does not have (CHECK came with 0.4.0, STATUS and GC with
    /// 1.1.0).
    pub fn require(self, min: Version, verb: &str) -> Result<(), CniError> {
        if self < min {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("cniVersion {self} does not allow {verb} (it needs {min} or later)"),
            )
            .version(self));
        }
        Ok(())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

pub fn supported_list() -> Vec<String> {
    SUPPORTED.iter().map(|v| v.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(Version::negotiate("1.0.0").unwrap(), Version(1, 0, 0));
        assert_eq!(Version::negotiate("0.4.0").unwrap(), Version(0, 4, 0));
        for bad in ["", "0.2.0", "1.0", "2.0.0"] {
            let e = Version::negotiate(bad).unwrap_err();
            assert_eq!(e.code, Code::IncompatibleVersion as u32, "{bad}");
        }
        assert!(Version(1, 0, 0).require(Version(1, 1, 0), "GC").is_err());
        assert!(Version(1, 1, 0).require(Version(1, 1, 0), "GC").is_ok());
        assert!(Version(0, 4, 0) < Version(1, 0, 0));
    }
}
