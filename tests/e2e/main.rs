//! The tests that need root, in one binary: each runs the real kernel
//! programs on a throwaway cgroup, in a network namespace of its own
//! (see the harness, tests/src). Outside CI, without root, they skip;
//! in CI they fail instead. Run alone with
//! `cargo test -p proxypilot-tests --test privileged` (after
//! `cargo build --bins`: they run target/debug/proxypilot), or one file's
//! tests with `-- escape::`.

mod clients;
mod demo;
mod deploy;
mod dns;
mod escape;
mod faults;
mod harness;
mod kernel;
mod metrics;
mod minted;
mod relay;
mod reload;
mod rules;
mod run;
mod unix_sockets;
mod websocket;
