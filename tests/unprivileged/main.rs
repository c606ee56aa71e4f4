//! The tests that need no root, in one binary: the relay end to end on
//! loopback with a stand-in kernel, the tokenizer (engine, server, wire
//! compatibility), the pooled upstream client, and the inputs the fuzz
//! targets found. Run alone with
//! `cargo test -p proxypilot-tests --test unprivileged`.

mod audit_line;
mod docs;
mod fuzz_regressions;
mod layout;
mod relay_e2e;
mod relay_minted;
mod tokenizer_compat;
mod tokenizer_engine;
mod tokenizer_macaroon;
mod tokenizer_mint;
mod tokenizer_server;
mod tokenizer_sigv4;
mod upstream_client;
