//! Protocol handlers a session runs once admitted. Opaque TCP today; PostgreSQL and SSH handlers plug
//! in here, chosen by the target's protocol.

pub mod splice;
pub mod tcp;
