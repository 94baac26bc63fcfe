//! Warden: a host agent that forces tagged processes' outbound TCP through a local proxy which verifies
//! their Okta identity, grants scoped time-bound access, injects credentials and records every session.
//!
//! Modules in the order a connection meets them: `bpf` (load, attach, pin) → `origin` (who opened this
//! socket) → `identity` (Okta tokens) → `policy` (pure decisions) → `grants` (time) → `proxy` (sessions)
//! → `protocol` → `audit` (the record). `daemon` wires them; `control` and `cli` are the operator's side.

pub mod audit;
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod duration;
pub mod exec;
pub mod grants;
pub mod identity;
pub mod origin;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod sockdiag;
pub mod timestamp;
