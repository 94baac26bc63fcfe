pub mod classify;
pub mod mask;
