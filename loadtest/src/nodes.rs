//! Reading each node's `/metrics` (resident memory, live sessions, CPU
//! seconds) and each Redis server's `INFO cpu`.
//!
//! The metrics port is the WebSocket port (one listener serves both), so
//! `ws://host:port/gateway` is scraped at `http://host:port/metrics`. A
//! node that cannot be scraped (behind an ingress that only routes
//! `/gateway`) just has no memory numbers in the report.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one scrape found.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub rss_bytes: Option<u64>,
    pub live_sessions: Option<u64>,
    /// `gateway_cpu_seconds_total`, else `process_cpu_seconds_total` (user
    /// + system, from the node's /proc).
    pub cpu_seconds: Option<f64>,
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

/// Reads RSS, CPU seconds and live sessions out of Prometheus text.
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
        } else if name.starts_with("gateway_cpu_seconds_total") {
            // The node's own, at 10 ms resolution.
            sample.cpu_seconds = Some(value);
        } else if name == "process_cpu_seconds_total" && sample.cpu_seconds.is_none() {
            // Whole seconds: only from a node without the finer one.
            sample.cpu_seconds = Some(value);
        } else if name.starts_with("gateway_sessions{") && name.contains(r#"state="live""#) {
            *sample.live_sessions.get_or_insert(0) += value as u64;
        }
    }
    sample
}

/// `host:port` of a `redis://[user:password@]host:port[/db]` URL (or a
/// bare `host:port`).
pub fn redis_authority(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("redis://")
        .unwrap_or(url)
        .rsplit('@')
        .next()?;
    let end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..end];
    authority.contains(':').then_some(authority)
}

/// Redis' CPU seconds so far (`used_cpu_user` + `used_cpu_sys` of `INFO
/// cpu`); `None` when it does not answer in time. Without AUTH: point it at
/// a Redis the run may read.
pub async fn redis_cpu(url: &str) -> Option<f64> {
    let authority = redis_authority(url)?;
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        stream.write_all(b"INFO cpu\r\n").await.ok()?;
        // A bulk string: `$LEN\r\n` then LEN bytes and `\r\n`.
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&reply);
            let (head, body) = text.split_once("\r\n")?;
            let len: usize = head.strip_prefix('$')?.parse().ok()?;
            if body.len() >= len {
                return parse_redis_cpu(&body[..len]);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()
        .flatten()
}

/// `used_cpu_user + used_cpu_sys` of an `INFO cpu` text.
pub fn parse_redis_cpu(info: &str) -> Option<f64> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_read_from_prometheus_text() {
        let body = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
            # TYPE process_resident_memory_bytes gauge\n\
            process_resident_memory_bytes 1.2345e7\n\
            process_cpu_seconds_total 12\n\
            gateway_cpu_seconds_total{node=\"n1\"} 12.5\n\
            gateway_sessions{node=\"n1\",state=\"live\"} 42\n\
            gateway_sessions{node=\"n1\",state=\"detached\"} 3\n";
        assert_eq!(
            parse(body),
            Sample {
                rss_bytes: Some(12_345_000),
                live_sessions: Some(42),
                cpu_seconds: Some(12.5),
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

    #[test]
    fn redis_cpu_is_user_plus_sys() {
        let info = "# CPU\r\nused_cpu_sys:1.25\r\nused_cpu_user:2.5\r\nused_cpu_sys_children:9\r\n";
        assert_eq!(parse_redis_cpu(info), Some(3.75));
        assert_eq!(parse_redis_cpu("# CPU\r\n"), None);
        assert_eq!(
            redis_authority("redis://127.0.0.1:6380/"),
            Some("127.0.0.1:6380")
        );
        assert_eq!(redis_authority("redis://u:p@h:1/0"), Some("h:1"));
        assert_eq!(redis_authority("h:2"), Some("h:2"));
        assert_eq!(redis_authority("redis://h"), None);
    }
}
