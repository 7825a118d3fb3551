//! Inter-container policy: rules between container names, kept in the state and mirrored into
//! the POLICY map keyed by identities (stable per name, so rules follow a container across
//! restarts and address changes).

use std::fmt;

use anyhow::{Context, Result};
use md_common::{PolicyKey, PolicyRule, POLICY_ALLOW, POLICY_DENY};
use serde::{Deserialize, Serialize};

use crate::{datapath::Datapath, state::State};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

impl Verdict {
    pub fn map_value(self) -> u8 {
        match self {
            Verdict::Allow => POLICY_ALLOW,
            Verdict::Deny => POLICY_DENY,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub from: String,
    pub to: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyState {
    /// Verdict for container pairs without a rule (deny = Docker's --icc=false).
    pub default: Verdict,
    pub rules: Vec<Rule>,
}

impl PolicyState {
    /// Sets the rule for (from, to), replacing any earlier one. Returns whether it changed.
    pub fn set(&mut self, from: &str, to: &str, verdict: Verdict) -> bool {
        match self.rules.iter_mut().find(|r| r.from == from && r.to == to) {
            Some(r) if r.verdict == verdict => false,
            Some(r) => {
                r.verdict = verdict;
                true
            }
            None => {
                self.rules.push(Rule {
                    from: from.to_string(),
                    to: to.to_string(),
                    verdict,
                });
                true
            }
        }
    }
}

/// Writes one rule into the POLICY map (identities are assigned on first use).
pub fn install(dp: &Datapath, state: &mut State, rule: &Rule) -> Result<()> {
    let key = PolicyKey {
        src_identity: state.identity_for(&rule.from),
        dst_identity: state.identity_for(&rule.to),
    };
    if !dp.is_loaded() {
        // Written when the datapath is loaded (see `sync`).
        return Ok(());
    }
    let mut map = dp.policy()?;
    let drops = map.get(&key, 0).map(|r| r.drops).unwrap_or(0);
    map.insert(
        key,
        PolicyRule {
            verdict: rule.verdict.map_value(),
            _pad: [0; 7],
            drops,
        },
        0,
    )
    .context("writing POLICY")?;
    Ok(())
}

/// Writes every rule and the default verdict (after the datapath was loaded afresh).
pub fn sync(dp: &Datapath, state: &mut State) -> Result<()> {
    let rules = state.policy.rules.clone();
    for r in &rules {
        install(dp, state, r)?;
    }
    let mut cfg = dp.config()?;
    cfg.policy_default = state.policy.default.map_value();
    dp.set_config(&cfg)
}

/// Drop counters per rule, read from the map.
pub fn drops(dp: &Datapath, state: &State, rule: &Rule) -> u64 {
    let (Some(s), Some(d)) = (
        state.identities.get(&rule.from),
        state.identities.get(&rule.to),
    ) else {
        return 0;
    };
    dp.policy()
        .ok()
        .and_then(|m| {
            m.get(
                &PolicyKey {
                    src_identity: *s,
                    dst_identity: *d,
                },
                0,
            )
            .ok()
        })
        .map(|r| r.drops)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_and_reports_change() {
        let mut p = PolicyState::default();
        assert!(p.set("a", "c", Verdict::Deny));
        assert!(!p.set("a", "c", Verdict::Deny));
        assert!(p.set("a", "c", Verdict::Allow));
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].verdict, Verdict::Allow);
    }

    #[test]
    fn identities_follow_names() {
        let mut s = State::default();
        let a = s.identity_for("a");
        let c = s.identity_for("c");
        assert_ne!(a, c);
        assert_eq!(s.identity_for("a"), a);
    }

    #[test]
    fn verdicts_map_to_the_datapath_values() {
        assert_eq!(Verdict::Allow.map_value(), POLICY_ALLOW);
        assert_eq!(Verdict::Deny.map_value(), POLICY_DENY);
        assert_eq!(Verdict::Allow.to_string(), "allow");
        assert_eq!(Verdict::Deny.to_string(), "deny");
        assert_eq!(Verdict::default(), Verdict::Allow);
    }

    #[test]
    fn set_keys_rules_by_both_names() {
        let mut p = PolicyState::default();
        assert!(p.set("a", "c", Verdict::Deny));
        assert!(p.set("a", "d", Verdict::Allow));
        assert!(p.set("b", "c", Verdict::Allow));
        let got: Vec<_> = p
            .rules
            .iter()
            .map(|r| (r.from.as_str(), r.to.as_str(), r.verdict))
            .collect();
        assert_eq!(
            got,
            [
                ("a", "c", Verdict::Deny),
                ("a", "d", Verdict::Allow),
                ("b", "c", Verdict::Allow)
            ]
        );
    }

    /// Without a loaded datapath, rules only get identities (written when it loads) and a
    /// sync fails (the default verdict lives in CONFIG).
    #[test]
    fn rules_without_a_datapath() {
        let dp = Datapath::new(std::path::Path::new("/nonexistent/md-policy-test"));
        let mut s = State::default();
        let rule = Rule {
            from: "web".into(),
            to: "db".into(),
            verdict: Verdict::Deny,
        };
        assert_eq!(drops(&dp, &s, &rule), 0, "no identities yet");
        install(&dp, &mut s, &rule).unwrap();
        assert_eq!(s.identities.get("web"), Some(&1));
        assert_eq!(s.identities.get("db"), Some(&2));
        assert_eq!(drops(&dp, &s, &rule), 0, "no map to read");
        s.policy.rules.push(Rule {
            from: "cache".into(),
            to: "db".into(),
            verdict: Verdict::Allow,
        });
        assert!(sync(&dp, &mut s).is_err());
        assert_eq!(s.identities.get("cache"), Some(&3));
    }
}
