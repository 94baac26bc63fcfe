//! Warden: a host agent that forces tagged processes' outbound TCP through a local proxy which verifies
//! their Okta identity, grants scoped time-bound access, injects credentials and records every session.
//!
//! Modules in the order a connection meets them: `bpf` (load, attach, pin) → `origin` (who opened this
//! socket) → `proxy` (the path of one connection) → `protocol` (the target kind's handler) → the gate in
//! `daemon` (`identity`: Okta tokens, `policy`: pure decisions, `grants`: time) → `audit` (the record).
//! `daemon` wires them; `control` is the control socket; `cli` is the top layer (nothing imports it);
//! `exec` runs `warden exec`'s command; `cgroup`, `config`, `clock`, `duration` and `timestamp` are leaves.

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
pub mod timestamp;
