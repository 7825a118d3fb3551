//! Inter-container policy verdicts: one hash lookup per packet, keyed by identities.

use md_common::{Config, PolicyKey, POLICY_DENY};

use crate::POLICY;

/// Whether `src` may send to `dst` in the original direction of a flow. A container always
/// reaches itself; identity 0 (not a container) is not subject to container policy.
#[inline(always)]
pub fn allowed(cfg: &Config, src: u32, dst: u32) -> bool {
    if src == dst || src == 0 || dst == 0 {
        return true;
    }
    let key = PolicyKey {
        src_identity: src,
        dst_identity: dst,
    };
    match POLICY.get_ptr_mut(&key) {
        Some(rule) => unsafe {
            if (*rule).verdict == POLICY_DENY {
                (*rule).drops += 1;
                false
            } else {
                true
            }
        },
        None => cfg.policy_default != POLICY_DENY,
    }
}
