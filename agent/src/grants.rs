//! Grants: identity + cgroup + target + access bound to an expiry. (Stub: lands with issue 6.)
