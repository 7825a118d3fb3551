//! Inter-container policy: rules between container names, kept in the state and mirrored into
//! the POLICY map keyed by identities (stable per name, so rules follow a container across
//! restarts and address changes).

use std::{collections::BTreeMap, fmt};

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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PolicyState {
    /// Verdict for container pairs without a rule (deny = Docker's --icc=false).
    pub default: Verdict,
}

/// Sets `rules` (later ones win), all or nothing: if writing POLICY fails midway (the map is
/// full), the entries written so far get their old values back and the error leaves the
/// state unsaved (the caller does not save; the lock's transaction rolls back), so neither the
/// rules nor the identities handed out here are kept (no later container inherits rules
/// through them). Each rule costs a few indexed lookups, however many
/// rules there are.
pub fn set_all(dp: &Datapath, state: &mut State, rules: &[Rule]) -> Result<()> {
    let mut keys: Vec<(PolicyKey, u8)> = Vec::new();
    // Later ones win: only the last word on each pair counts.
    let mut last: std::collections::HashMap<(&str, &str), usize> = Default::default();
    for (i, r) in rules.iter().enumerate() {
        last.insert((&r.from, &r.to), i);
    }
    for (i, r) in rules.iter().enumerate() {
        if last[&(r.from.as_str(), r.to.as_str())] != i || !state.put_rule(r)? {
            continue;
        }
        let key = PolicyKey {
            src_identity: state.identity_for(&r.from)?,
            dst_identity: state.identity_for(&r.to)?,
        };
        keys.push((key, r.verdict.map_value()));
    }
    write_rules(dp, &keys)
}

/// Writes rules into POLICY; on an error, undoes the writes it made.
fn write_rules(dp: &Datapath, keys: &[(PolicyKey, u8)]) -> Result<()> {
    if !dp.is_loaded() {
        // Written when the datapath is loaded (see `sync`).
        return Ok(());
    }
    let mut map = dp.policy()?;
    let mut undo: Vec<(PolicyKey, Option<PolicyRule>)> = Vec::with_capacity(keys.len());
    for (n, (key, verdict)) in keys.iter().enumerate() {
        let old = map.get(key, 0).ok();
        let rule = PolicyRule {
            verdict: *verdict,
            _pad: [0; 7],
            drops: old.map(|r| r.drops).unwrap_or(0),
        };
        if let Err(e) = map.insert(*key, rule, 0) {
            for (key, old) in undo.iter().rev() {
                let _ = match old {
                    Some(v) => map.insert(*key, *v, 0),
                    None => map.remove(key),
                };
            }
            let full = matches!(&e, aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG));
            if full {
                anyhow::bail!(
                    "the POLICY map is full ({} entries) after {n} of {} new rules; none was applied",
                    md_common::maps::POLICY_MAX,
                    keys.len()
                );
            }
            return Err(e).context("writing POLICY; none of the rules was applied");
        }
        undo.push((*key, old));
    }
    Ok(())
}

/// Writes every rule and the default verdict (after the datapath was loaded afresh).
pub fn sync(dp: &Datapath, state: &mut State) -> Result<()> {
    let mut keys = Vec::new();
    for r in state.rules()? {
        let key = PolicyKey {
            src_identity: state.identity_for(&r.from)?,
            dst_identity: state.identity_for(&r.to)?,
        };
        keys.push((key, r.verdict.map_value()));
    }
    write_rules(dp, &keys)?;
    let mut cfg = dp.config()?;
    cfg.policy_default = state.policy.default.map_value();
    dp.set_config(&cfg)
}

/// `name` was given another identity (the store's, issue 17): its rules move to it in POLICY.
pub fn reidentify(dp: &Datapath, state: &mut State, name: &str, old: Option<u32>) -> Result<()> {
    let rules = state.rules_of(name)?;
    if rules.is_empty() || !dp.is_loaded() {
        return Ok(());
    }
    let mut map = dp.policy()?;
    let mut keys = Vec::new();
    for r in rules {
        let (s, d) = (state.identity_for(&r.from)?, state.identity_for(&r.to)?);
        if let Some(old) = old {
            let stale = PolicyKey {
                src_identity: if r.from == name { old } else { s },
                dst_identity: if r.to == name { old } else { d },
            };
            let _ = map.remove(&stale);
        }
        let key = PolicyKey {
            src_identity: s,
            dst_identity: d,
        };
        keys.push((key, r.verdict.map_value()));
    }
    write_rules(dp, &keys)
}

/// Drop counters of a rule, read from the map (`identities`: by name).
pub fn drops(dp: &Datapath, identities: &BTreeMap<String, u32>, rule: &Rule) -> u64 {
    let (Some(s), Some(d)) = (identities.get(&rule.from), identities.get(&rule.to)) else {
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
    use crate::state::StateDir;

    fn rule(f: &str, t: &str, v: Verdict) -> Rule {
        Rule {
            from: f.into(),
            to: t.into(),
            verdict: v,
        }
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("md-policy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn set_all_stores_the_last_word_on_each_pair() {
        let dir = tempdir("last");
        let dp = Datapath::new(std::path::Path::new("/nonexistent/md-pins"));
        let mut l = StateDir::new(&dir).lock().unwrap();
        set_all(
            &dp,
            &mut l.state,
            &[
                rule("a", "b", Verdict::Deny),
                rule("b", "a", Verdict::Deny),
                rule("c", "a", Verdict::Deny),
                rule("c", "a", Verdict::Allow),
            ],
        )
        .unwrap();
        assert_eq!(
            l.state.rules().unwrap(),
            [
                rule("a", "b", Verdict::Deny),
                rule("b", "a", Verdict::Deny),
                rule("c", "a", Verdict::Allow)
            ]
        );
        set_all(&dp, &mut l.state, &[rule("b", "a", Verdict::Allow)]).unwrap();
        assert_eq!(l.state.rule("b", "a").unwrap(), Some(Verdict::Allow));
        assert_eq!(
            l.state.rules().unwrap().len(),
            3,
            "a verdict changes in place"
        );
        assert_eq!(l.state.identities().unwrap().len(), 3);
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unsaved_rules_and_identities_are_rolled_back() {
        let dir = tempdir("rollback");
        let dp = Datapath::new(std::path::Path::new("/nonexistent/md-pins"));
        let sd = StateDir::new(&dir);
        {
            let mut l = sd.lock().unwrap();
            set_all(&dp, &mut l.state, &[rule("a", "b", Verdict::Deny)]).unwrap();
            l.save().unwrap();
            set_all(&dp, &mut l.state, &[rule("x", "y", Verdict::Deny)]).unwrap();
            // Dropped without saving: a failed command.
        }
        let l = sd.lock().unwrap();
        assert_eq!(l.state.rules().unwrap(), [rule("a", "b", Verdict::Deny)]);
        assert_eq!(l.state.identity("x").unwrap(), None);
        assert_eq!(l.state.next_identity, 3, "a and b only");
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identities_follow_names() {
        let dir = tempdir("ids");
        let mut s = State::default();
        let a = s.identity_for("a").unwrap();
        let c = s.identity_for("c").unwrap();
        assert_ne!(a, c);
        assert_eq!(s.identity_for("a").unwrap(), a);
        assert!(a > 0 && c > 0, "0 means no identity in the datapath");
        let _ = dir;
    }
}
