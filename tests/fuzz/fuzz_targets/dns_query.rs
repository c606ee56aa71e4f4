//! What proxypilot's resolver reads from the sandbox: every datagram (and
//! TCP message) sent to any port 53. `dns::message::Question::parse`, then
//! the answers built from it, and an "upstream" reply checked against it
//! and relayed.
//!
//! Input: the sandbox's message, optionally followed by the marker
//! `\xffDNS\xff` and an upstream reply to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxypilot::dns::message::{Question, MAX_LABEL_LEN, MAX_NAME_LEN};

const MARKER: &[u8] = b"\xffDNS\xff";

fn split(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.windows(MARKER.len()).position(|w| w == MARKER) {
        Some(i) => (&data[..i], Some(&data[i + MARKER.len()..])),
        None => (data, None),
    }
}

/// An answer the resolver sends: a response to the client's id with its
/// question, that parses again.
fn check_answer(q: &Question, bytes: &[u8], limit: usize) {
    assert!(
        bytes.len() <= limit,
        "answer of {} over {limit}",
        bytes.len()
    );
    let a = Question::parse(bytes);
    // A response is not a query: parse refuses it, for this reason only.
    assert_eq!(
        a.unwrap_err(),
        proxypilot::dns::message::Malformed::NotAQuery,
        "our answer does not read back as a response"
    );
    assert_eq!(u16::from_be_bytes([bytes[0], bytes[1]]), q.id, "answer id");
}

fuzz_target!(|data: &[u8]| {
    let (query, upstream) = split(data);
    let Ok(q) = Question::parse(query) else {
        return;
    };
    // What the policy matches: lowercase, within the caps.
    assert!(q.key.len() <= MAX_NAME_LEN, "key length");
    assert!(
        !q.key.bytes().any(|b| b.is_ascii_uppercase()),
        "key case: {:?}",
        q.key
    );
    assert!(
        q.name.iter().all(|l| l.len() <= MAX_LABEL_LEN),
        "label length"
    );
    // A key in host-name characters (the only ones an allowed pattern has)
    // is exactly the labels joined by dots: a label holding a dot, or any
    // other byte, shows escaped and can never match an allowed name.
    let plain = q.key.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
    });
    if q.host_name {
        assert!(
            plain && !q.key.is_empty(),
            "a host name with an odd key: {:?}",
            q.key
        );
    }
    if plain && !q.key.is_empty() {
        let joined: Vec<String> = q
            .name
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        assert_eq!(joined.join("."), q.key, "the key is not the labels");
    }

    let limit = q.udp_limit();
    assert!((512..=1232).contains(&limit));
    for rcode in [
        hickory_proto::op::ResponseCode::NXDomain,
        hickory_proto::op::ResponseCode::Refused,
        hickory_proto::op::ResponseCode::ServFail,
    ] {
        check_answer(&q, &q.answer_with(rcode), 65_535);
    }

    // The upstream query holds the question and nothing of the client's.
    let up = q.upstream_query(0x5151);
    let parsed = Question::parse(&up).expect("our upstream query parses");
    assert_eq!(parsed.id, 0x5151);
    assert_eq!(parsed.key, q.key, "upstream question");
    assert_eq!(parsed.qtype, q.qtype);

    if let Some(reply) = upstream.filter(|r| r.len() >= 2) {
        let id = u16::from_be_bytes([reply[0], reply[1]]);
        if let Some(m) = q.matches_upstream(id, reply) {
            let (bytes, n) = q.relay_answer(m.clone(), limit);
            check_answer(&q, &bytes, limit);
            assert!(n <= m.answers.len());
            let (bytes, _) = q.relay_answer(m, 65_535);
            check_answer(&q, &bytes, 65_535);
        }
    }
});
