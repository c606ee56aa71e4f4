//! DNS messages as the resolver reads and writes them, through
//! `hickory-proto`: the sandbox's query checked and reduced to one
//! question, the query proxypilot sends upstream built fresh from that
//! question alone, and the answers written back.
//!
//! Nothing the sandbox put in a query other than the question (its other
//! sections, EDNS options, padding, its message id) reaches an upstream.

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RecordType},
};

/// Longest name accepted, in presentation form without the final dot.
pub const MAX_NAME_LEN: usize = 253;
/// Longest label accepted.
pub const MAX_LABEL_LEN: usize = 63;
/// Largest answer proxypilot puts in a UDP datagram whatever the client's
/// EDNS size (the DNS flag day 2020 value); 512 without EDNS.
pub const MAX_UDP_ANSWER: usize = 1232;
/// The smallest datagram that can hold a header and a question.
const MIN_QUERY_LEN: usize = 12 + 1 + 4;

/// Why a datagram was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("not a DNS message")]
    Unreadable,
    #[error("a response, not a query")]
    NotAQuery,
    #[error("an opcode other than QUERY")]
    Opcode,
    #[error("not exactly one question")]
    QuestionCount,
    #[error("records in the answer or authority section of a query")]
    Records,
    #[error("a name longer than {MAX_NAME_LEN} characters or a label over {MAX_LABEL_LEN}")]
    TooLong,
}

/// The one question of a well-formed query, and what its answer must echo.
#[derive(Debug, Clone)]
pub struct Question {
    pub id: u16,
    /// The name as the sandbox wrote it (its letter case is echoed back).
    pub name: Name,
    /// Lowercase, without the final dot, non-printable bytes escaped: what
    /// the policy matches and the audit line shows.
    pub key: String,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    /// Every label is letters, digits, `-` and `_` only, not starting or
    /// ending with `-`, so `key` is the labels joined by dots. Only such a name can be allowed: a label
    /// holding a dot (`example.com` as one label) would otherwise read as
    /// two in `key`, and match a pattern it is not under.
    pub host_name: bool,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The client's EDNS payload size, when it sent an OPT record.
    pub edns_payload: Option<u16>,
    pub dnssec_ok: bool,
}

impl Question {
    /// Reads and checks one query.
    pub fn parse(bytes: &[u8]) -> Result<Question, Malformed> {
        if bytes.len() < MIN_QUERY_LEN {
            return Err(Malformed::Unreadable);
        }
        let msg = Message::from_vec(bytes).map_err(|_| Malformed::Unreadable)?;
        if msg.metadata.message_type != MessageType::Query {
            return Err(Malformed::NotAQuery);
        }
        if msg.metadata.op_code != OpCode::Query {
            return Err(Malformed::Opcode);
        }
        if msg.queries.len() != 1 {
            return Err(Malformed::QuestionCount);
        }
        if !msg.answers.is_empty() || !msg.authorities.is_empty() {
            return Err(Malformed::Records);
        }
        let q = &msg.queries[0];
        let name = q.name().clone();
        if name.iter().any(|label| label.len() > MAX_LABEL_LEN) {
            return Err(Malformed::TooLong);
        }
        let ascii = name.to_lowercase().to_ascii();
        let key = ascii.strip_suffix('.').unwrap_or(&ascii).to_string();
        if key.len() > MAX_NAME_LEN {
            return Err(Malformed::TooLong);
        }
        // The label rules of `policy::normalize_host`, which every allowed
        // pattern passed.
        let host_name = name.num_labels() > 0
            && name.iter().all(|label| {
                !label.is_empty()
                    && !label.starts_with(b"-")
                    && !label.ends_with(b"-")
                    && label
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            });
        Ok(Question {
            id: msg.metadata.id,
            host_name,
            name,
            key,
            qtype: q.query_type(),
            qclass: q.query_class(),
            recursion_desired: msg.metadata.recursion_desired,
            checking_disabled: msg.metadata.checking_disabled,
            edns_payload: msg.edns.as_ref().map(Edns::max_payload),
            dnssec_ok: msg.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        })
    }

    /// The largest answer this client takes over UDP.
    pub fn udp_limit(&self) -> usize {
        self.edns_payload
            .map_or(512, |p| usize::from(p).clamp(512, MAX_UDP_ANSWER))
    }

    /// An answer with `rcode` and no records (a refusal, or a failure).
    pub fn answer_with(&self, rcode: ResponseCode) -> Vec<u8> {
        let msg = self.response(rcode);
        msg.to_vec()
            .expect("a header and one question always encode")
    }

    /// A response skeleton: the client's id, flags and question.
    fn response(&self, rcode: ResponseCode) -> Message {
        let mut msg = Message::response(self.id, OpCode::Query);
        msg.metadata.recursion_desired = self.recursion_desired;
        msg.metadata.recursion_available = true;
        msg.metadata.checking_disabled = self.checking_disabled;
        msg.metadata.response_code = rcode;
        let mut q = Query::query(self.name.clone(), self.qtype);
        q.set_query_class(self.qclass);
        msg.add_query(q);
        if self.edns_payload.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP_ANSWER as u16);
            edns.flags_mut().dnssec_ok = self.dnssec_ok;
            msg.set_edns(edns);
        }
        msg
    }

    /// The query proxypilot sends upstream: a fresh id, the question (in
    /// lowercase) and nothing else the client sent.
    pub fn upstream_query(&self, id: u16) -> Vec<u8> {
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.metadata.checking_disabled = self.checking_disabled;
        let mut q = Query::query(self.name.to_lowercase(), self.qtype);
        q.set_query_class(self.qclass);
        msg.add_query(q);
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_ANSWER as u16);
        edns.flags_mut().dnssec_ok = self.dnssec_ok;
        msg.set_edns(edns);
        msg.to_vec()
            .expect("a header and one question always encode")
    }

    /// Whether `bytes` is a reply to the upstream query with `id`: a
    /// response, with that id and this question. Anything else is ignored
    /// (a late or spoofed datagram).
    pub fn matches_upstream(&self, id: u16, bytes: &[u8]) -> Option<Message> {
        let msg = Message::from_vec(bytes).ok()?;
        let q = msg.queries.first()?;
        (msg.metadata.message_type == MessageType::Response
            && msg.metadata.id == id
            && msg.queries.len() == 1
            && q.name() == &self.name
            && q.query_type() == self.qtype
            && q.query_class() == self.qclass)
            .then_some(msg)
    }

    /// The client's answer from the upstream's: its records and rcode
    /// under the client's id, flags and question. Over UDP, an answer
    /// larger than the client takes is cut to the header and question with
    /// TC set, so the client asks again over TCP. Returns the bytes and the
    /// number of answer records.
    pub fn relay_answer(&self, upstream: Message, limit: usize) -> (Vec<u8>, usize) {
        let mut msg = self.response(upstream.metadata.response_code);
        msg.metadata.authentic_data = upstream.metadata.authentic_data;
        let answers = upstream.answers.len();
        msg.answers = upstream.answers;
        msg.authorities = upstream.authorities;
        // The OPT record is ours (set by `response`); any other the
        // upstream sent would make two.
        msg.additionals = upstream
            .additionals
            .into_iter()
            .filter(|r| r.record_type() != RecordType::OPT)
            .collect();
        match msg.to_vec() {
            // Only an answer that reads back is sent: whatever the upstream
            // sent, the client gets a well-formed message or SERVFAIL.
            Ok(bytes) if Message::from_vec(&bytes).is_err() => {
                (self.answer_with(ResponseCode::ServFail), 0)
            }
            Ok(bytes) if bytes.len() <= limit => (bytes, answers),
            Ok(_) => {
                let mut cut = self.response(msg.metadata.response_code);
                cut.metadata.truncation = true;
                (
                    cut.to_vec()
                        .expect("a header and one question always encode"),
                    0,
                )
            }
            Err(_) => (self.answer_with(ResponseCode::ServFail), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{rdata::A, RData, Record};

    fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut msg = Message::new(0x4242, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            msg.set_edns(Edns::new());
        }
        msg.to_vec().unwrap()
    }

    #[test]
    fn reads_one_question_and_normalises_the_key() {
        let q = Question::parse(&query("Api.Example.COM.", RecordType::AAAA, true)).unwrap();
        assert_eq!(q.id, 0x4242);
        assert_eq!(q.key, "api.example.com");
        assert_eq!(q.qtype, RecordType::AAAA);
        assert!(q.edns_payload.is_some());
        // The refusal echoes the name as the client wrote it.
        let reply = Message::from_vec(&q.answer_with(ResponseCode::NXDomain)).unwrap();
        assert_eq!(reply.metadata.id, 0x4242);
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert!(reply.queries[0].name().eq_case(&q.name));
        assert!(reply.answers.is_empty());
    }

    #[test]
    fn drops_what_is_not_one_plain_query() {
        assert_eq!(
            Question::parse(b"hello").unwrap_err(),
            Malformed::Unreadable
        );
        assert_eq!(
            Question::parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(),
            Malformed::Unreadable
        );
        let mut response = Message::from_vec(&query("a.example", RecordType::A, false)).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert_eq!(
            Question::parse(&response.to_vec().unwrap()).unwrap_err(),
            Malformed::NotAQuery
        );
        let mut two = Message::from_vec(&query("a.example", RecordType::A, false)).unwrap();
        two.add_query(Query::query(
            Name::from_ascii("b.example").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            Question::parse(&two.to_vec().unwrap()).unwrap_err(),
            Malformed::QuestionCount
        );
        let mut update = Message::from_vec(&query("a.example", RecordType::A, false)).unwrap();
        update.metadata.op_code = OpCode::Update;
        assert_eq!(
            Question::parse(&update.to_vec().unwrap()).unwrap_err(),
            Malformed::Opcode
        );
        let mut stuffed = Message::from_vec(&query("a.example", RecordType::A, false)).unwrap();
        stuffed.add_answer(Record::from_rdata(
            Name::from_ascii("a.example").unwrap(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        assert_eq!(
            Question::parse(&stuffed.to_vec().unwrap()).unwrap_err(),
            Malformed::Records
        );
    }

    /// A query written byte by byte, so that names hickory would refuse to
    /// build can be sent.
    fn raw_query(labels: &[&str]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in labels {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m
    }

    #[test]
    fn caps_the_name_and_label_length() {
        // 253 characters: the longest name there is.
        let (a61, a62, a63) = ("a".repeat(61), "a".repeat(62), "a".repeat(63));
        let longest = [a63.as_str(), &a63, &a63, &a61];
        let q = Question::parse(&raw_query(&longest)).unwrap();
        assert_eq!(q.key.len(), MAX_NAME_LEN);
        // One more character, or a 64-byte label: dropped.
        let over = [a63.as_str(), &a63, &a63, &a62];
        assert!(Question::parse(&raw_query(&over)).is_err());
        let a64 = "a".repeat(64);
        assert!(Question::parse(&raw_query(&[a64.as_str(), "example"])).is_err());
        assert!(Question::parse(&raw_query(&[a63.as_str(), "example"])).is_ok());
    }

    #[test]
    fn a_label_holding_a_dot_never_reads_as_two_labels() {
        // Found by the dns_query fuzz target: the label "example.com" is
        // one label, and must never match the allowed name example.com.
        let q = Question::parse(&raw_query(&["api", "example.com"])).unwrap();
        assert_eq!(q.key, "api.example\\.com");
        assert!(!q.host_name);
        let q = Question::parse(&raw_query(&["api", "example", "com"])).unwrap();
        assert!(q.host_name);
        assert!(
            !Question::parse(&raw_query(&["a b", "com"]))
                .unwrap()
                .host_name
        );
    }

    #[test]
    fn the_upstream_query_carries_only_the_question() {
        let mut msg = Message::from_vec(&query("Data.Example", RecordType::TXT, true)).unwrap();
        msg.add_additional(Record::from_rdata(
            Name::from_ascii("smuggled.example").unwrap(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        let q = Question::parse(&msg.to_vec().unwrap()).unwrap();
        let up = Message::from_vec(&q.upstream_query(7)).unwrap();
        assert_eq!(up.metadata.id, 7);
        assert_eq!(up.queries.len(), 1);
        assert_eq!(up.queries[0].name().to_ascii(), "data.example.");
        assert!(up.additionals.is_empty() && up.answers.is_empty());
    }

    #[test]
    fn relays_answers_and_truncates_for_small_clients() {
        let q = Question::parse(&query("many.example", RecordType::A, false)).unwrap();
        let mut up = Message::response(9, OpCode::Query);
        up.add_query(Query::query(
            Name::from_ascii("many.example").unwrap(),
            RecordType::A,
        ));
        for i in 0..60u8 {
            up.add_answer(Record::from_rdata(
                Name::from_ascii("many.example").unwrap(),
                60,
                RData::A(A::new(192, 0, 2, i)),
            ));
        }
        let up_bytes = up.to_vec().unwrap();
        assert!(q.matches_upstream(8, &up_bytes).is_none(), "wrong id");
        let m = q.matches_upstream(9, &up_bytes).expect("matches");
        let (bytes, n) = q.relay_answer(m.clone(), 65535);
        assert_eq!(n, 60);
        let reply = Message::from_vec(&bytes).unwrap();
        assert_eq!((reply.metadata.id, reply.answers.len()), (0x4242, 60));
        let (bytes, n) = q.relay_answer(m, q.udp_limit());
        let reply = Message::from_vec(&bytes).unwrap();
        assert!(reply.metadata.truncation && reply.answers.is_empty() && n == 0);
    }
}
