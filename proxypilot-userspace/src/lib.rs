//! proxypilot: a sidecar that keeps real API keys out of a sandbox.
//!
//! The kernel half (`kernel`) decides every connect() of the sandbox's
//! cgroup; the user half terminates TLS for intercepted hosts (`tls`,
//! `relay`) and injects sealed credentials through the tokenizer
//! (`tokenizer`).

pub mod audit;
pub mod cli;
pub mod doctor;
pub mod hop;
pub mod info;
pub mod kernel;
pub mod paths;
pub mod policy;
pub mod relay;
pub mod run;
pub mod settings;
pub mod sidecar;
pub mod tls;
pub mod tokenizer;
