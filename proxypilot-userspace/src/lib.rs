//! proxypilot: a sidecar that keeps real API keys out of a sandbox.
//!
//! The kernel half (`kernel`) decides every connect() of the sandbox's
//! cgroup; the user half terminates TLS for intercepted hosts (`tls`,
//! `relay`) and injects sealed credentials through the tokenizer
//! (`tokenizer`).

pub mod accept;
pub mod audit;
pub mod cli;
pub mod dns;
pub mod fdlimit;
pub mod info;
pub mod local_http;
pub mod logbudget;
pub mod logwriter;
pub mod memory;
pub mod policy;
pub mod relay;
pub mod run;
pub mod settings;
pub mod sidecar;
pub mod tls;

// The kernel half and the tokenizer are crates of their own; these keep
// `proxypilot::kernel::…`, `proxypilot::tokenizer::…` and `proxypilot::hop::…`
// working for the binary, the tests and the fuzz targets.
pub use proxypilot_kernel as kernel;
pub use proxypilot_tokenizer as tokenizer;
pub use proxypilot_tokenizer::hop;
