//! Asking an upstream resolver: a fresh query with a random ID from a fresh socket (random
//! source port), the answer checked against the question by `answer::parse_answer`; UDP first,
//! TCP when the answer is truncated. The servers are tried in order.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

use egress_dns_wire::answer::{Answer, AnswerError, MAX_ANSWER_LEN, parse_answer};
use egress_dns_wire::message::{PROXY_EDNS_UDP_SIZE, Question, flag};
use egress_dns_wire::wire::{HEADER_LEN, rtype, write_plain_name};

/// Datagrams from the server that are not the answer (stale, spoofed) read before giving up.
const MAX_STRAY_DATAGRAMS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver is configured")]
    NoServers,
    #[error("the query for `{0}` cannot be written")]
    Unwritable(String),
    #[error("{server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{server}: no answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("{server}: unusable answer: {source}")]
    Answer {
        server: SocketAddr,
        #[source]
        source: AnswerError,
    },
}

/// The resolvers the proxy may ask.
#[derive(Clone, Debug)]
pub struct Upstream {
    servers: Vec<SocketAddr>,
    timeout: Duration,
}

impl Upstream {
    /// `servers` on port 53, each given `timeout` per attempt.
    pub fn new(servers: &[IpAddr], timeout: Duration) -> Self {
        Upstream {
            servers: servers.iter().map(|ip| SocketAddr::new(*ip, 53)).collect(),
            timeout,
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The first usable answer from the servers, in order; the last error when none answers.
    pub async fn ask(&self, question: &Question) -> Result<Answer, UpstreamError> {
        let mut last = UpstreamError::NoServers;
        for server in &self.servers {
            match self.ask_one(*server, question).await {
                Ok(answer) => return Ok(answer),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn ask_one(
        &self,
        server: SocketAddr,
        question: &Question,
    ) -> Result<Answer, UpstreamError> {
        let id: u16 = rand::random();
        let query = build_query(id, question)
            .ok_or_else(|| UpstreamError::Unwritable(question.qname.clone()))?;
        match self.udp(server, id, &query, question).await {
            Err(UpstreamError::Answer {
                source: AnswerError::Truncated,
                ..
            }) => {
                let id: u16 = rand::random();
                let query = build_query(id, question)
                    .ok_or_else(|| UpstreamError::Unwritable(question.qname.clone()))?;
                self.tcp(server, id, &query, question).await
            }
            other => other,
        }
    }

    async fn udp(
        &self,
        server: SocketAddr,
        id: u16,
        query: &[u8],
        question: &Question,
    ) -> Result<Answer, UpstreamError> {
        let io = |source| UpstreamError::Io { server, source };
        let bind: SocketAddr = match server {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(server).await.map_err(io)?;
        socket.send(query).await.map_err(io)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut buf = vec![0u8; usize::from(PROXY_EDNS_UDP_SIZE).max(4096)];
        for _ in 0..MAX_STRAY_DATAGRAMS {
            let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Ok(r) => r.map_err(io)?,
                Err(_) => break,
            };
            match parse_answer(&buf[..n], id, question) {
                Ok(answer) => return Ok(answer),
                // Not the answer to this query (an old or forged datagram): keep waiting.
                Err(AnswerError::IdMismatch { .. } | AnswerError::QuestionMismatch) => {}
                Err(source) => return Err(UpstreamError::Answer { server, source }),
            }
        }
        Err(UpstreamError::Timeout {
            server,
            timeout: self.timeout,
        })
    }

    async fn tcp(
        &self,
        server: SocketAddr,
        id: u16,
        query: &[u8],
        question: &Question,
    ) -> Result<Answer, UpstreamError> {
        let io = |source| UpstreamError::Io { server, source };
        let exchange = async {
            let mut stream = TcpStream::connect(server).await.map_err(io)?;
            let len = u16::try_from(query.len())
                .map_err(|_| UpstreamError::Unwritable(question.qname.clone()))?;
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(query);
            stream.write_all(&framed).await.map_err(io)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.map_err(io)?;
            let len = usize::from(u16::from_be_bytes(len)).min(MAX_ANSWER_LEN);
            let mut msg = vec![0u8; len];
            stream.read_exact(&mut msg).await.map_err(io)?;
            parse_answer(&msg, id, question)
                .map_err(|source| UpstreamError::Answer { server, source })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                server,
                timeout: self.timeout,
            }),
        }
    }
}

/// A recursive query for `question` with an EDNS OPT advertising the proxy's UDP size.
pub fn build_query(id: u16, question: &Question) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(HEADER_LEN + question.qname.len() + 2 + 4 + 11);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&flag::RD.to_be_bytes());
    // QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 1 (the OPT).
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    write_plain_name(&mut q, &question.qname)?;
    q.extend_from_slice(&question.qtype.to_be_bytes());
    q.extend_from_slice(&question.qclass.to_be_bytes());
    // OPT: root owner, type 41, class = UDP size, TTL 0 (version 0, no DO), no options.
    q.push(0);
    q.extend_from_slice(&rtype::OPT.to_be_bytes());
    q.extend_from_slice(&PROXY_EDNS_UDP_SIZE.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    Some(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_dns_wire::message::{Transport, parse_query};

    #[test]
    fn the_upstream_query_parses_as_a_query_for_the_same_question() {
        let question = Question {
            qname: "api.example.test".into(),
            qtype: rtype::AAAA,
            qclass: 1,
        };
        let q = build_query(0xbeef, &question).unwrap();
        let parsed = parse_query(&q, Transport::Udp).unwrap();
        assert_eq!(parsed.id, 0xbeef);
        assert_eq!(parsed.question, question);
        assert!(parsed.recursion_desired());
        assert_eq!(parsed.edns.unwrap().udp_payload_size, PROXY_EDNS_UDP_SIZE);
    }
}
