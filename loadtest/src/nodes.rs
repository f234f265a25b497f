//! Reading each node's `/metrics`: resident memory and live sessions.
//!
//! The metrics port is the WebSocket port (one listener serves both), so
//! `ws://host:port/gateway` is scraped at `http://host:port/metrics`. A
//! node that cannot be scraped (behind an ingress that only routes
//! `/gateway`) just has no memory numbers in the report.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one scrape found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub rss_bytes: Option<u64>,
    pub live_sessions: Option<u64>,
}

/// `host:port` of a `ws://host:port/path` URL.
pub fn authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("ws://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    (!authority.is_empty()).then_some(authority)
}

/// Scrapes the node behind `url`; `None` when it does not answer in time.
pub async fn scrape(url: &str) -> Option<Sample> {
    let authority = authority(url)?;
    let host = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(&host).await.ok()?;
        // HTTP/1.0 so the body comes unchunked and ends with the connection.
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1) == Some("200")).then(|| parse(body))
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()
        .flatten()
}

/// Reads the two gauges out of Prometheus text.
pub fn parse(body: &str) -> Sample {
    let mut sample = Sample::default();
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        if name == "process_resident_memory_bytes" {
            sample.rss_bytes = Some(value as u64);
        } else if name.starts_with("gateway_sessions{") && name.contains(r#"state="live""#) {
            *sample.live_sessions.get_or_insert(0) += value as u64;
        }
    }
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_read_from_prometheus_text() {
        let body = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
            # TYPE process_resident_memory_bytes gauge\n\
            process_resident_memory_bytes 1.2345e7\n\
            gateway_sessions{node=\"n1\",state=\"live\"} 42\n\
            gateway_sessions{node=\"n1\",state=\"detached\"} 3\n";
        assert_eq!(
            parse(body),
            Sample {
                rss_bytes: Some(12_345_000),
                live_sessions: Some(42)
            }
        );
        assert_eq!(parse(""), Sample::default());
    }

    #[test]
    fn authorities_come_from_ws_urls() {
        assert_eq!(
            authority("ws://127.0.0.1:8080/gateway"),
            Some("127.0.0.1:8080")
        );
        assert_eq!(authority("ws://h:1?v=1"), Some("h:1"));
        assert_eq!(authority("ws://h"), Some("h"));
        assert_eq!(authority("http://h/"), None);
        assert_eq!(authority("ws:///x"), None);
    }
}
