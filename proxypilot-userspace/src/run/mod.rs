//! `proxypilot run`: sandbox one command (see `cli::run`).

pub mod secrets;
