//! `fwmark run --metrics ADDR`: the counters in Prometheus text format at
//! `GET /metrics`. A bare port binds 127.0.0.1; give an address to listen
//! elsewhere. Each scrape reads the pinned maps and the state afresh, so it
//! is right after an `fwmark apply` from another process too.

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::{
    datapath::Maps,
    live,
    state::{Lock, Paths},
    status::Snapshot,
};

/// `9469` -> `127.0.0.1:9469`; anything else is used as given.
pub fn listen_address(addr: &str) -> String {
    if !addr.is_empty() && addr.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{addr}")
    } else {
        addr.to_string()
    }
}

/// Binds and serves in a background task.
pub async fn serve(addr: &str, paths: Paths) -> Result<JoinHandle<()>> {
    let addr = listen_address(addr);
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("--metrics: cannot listen on {addr}"))?;
    info!("serving metrics at http://{addr}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let paths = paths.clone();
                    tokio::spawn(async move {
                        if let Err(e) = respond(stream, &paths).await {
                            warn!("metrics request failed: {e:#}");
                        }
                    });
                }
                Err(e) => warn!("metrics: accept failed: {e}"),
            }
        }
    }))
}

/// The current exposition for the interface.
pub fn exposition(paths: &Paths) -> Result<String> {
    let maps = Maps::from_pins(&paths.pin_dir)?;
    let (state, _) = live::peek_state(paths, &maps)?.context("no state")?;
    let daemon = Lock::daemon_holder(paths).and_then(|p| p.parse().ok());
    Ok(Snapshot::collect(&state, &maps, daemon)?.prometheus())
}

async fn respond(mut stream: TcpStream, paths: &Paths) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read the request head (the first line is all that matters).
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[..len].contains(&b'\n') {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => match exposition(paths) {
            Ok(body) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
            Err(e) => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                format!("fwmark: cannot read counters: {e:#}\n"),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "fwmark serves /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bare_port_listens_on_loopback_only() {
        assert_eq!(super::listen_address("9469"), "127.0.0.1:9469");
        assert_eq!(super::listen_address("0.0.0.0:9469"), "0.0.0.0:9469");
        assert_eq!(super::listen_address("[::1]:9469"), "[::1]:9469");
    }
}
