//! The connection to the SMTP server, secured by us (so that the certificate rules of `tls` apply)
//! and handed to lettre's SMTP session as a stream.
//!
//! - `tls`: TLS from the first byte (port 465).
//! - `starttls`: the greeting, `EHLO` and `STARTTLS` are exchanged here in plain text (bounded:
//!   lines of at most 4 KiB, replies of at most 100 lines), then the handshake; anything the server
//!   sent after its `220` to `STARTTLS` and before the handshake is refused (RFC 3207 injection). The
//!   secured stream starts with a synthetic `220` greeting, which lettre reads before its own `EHLO`
//!   (which RFC 3207 requires after STARTTLS anyway).
//! - `none`: plain text (only ever without credentials, or on loopback).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use lettre::transport::smtp::client::AsyncTokioStream;
use lettre::transport::smtp::extension::ClientId;
use rustls::pki_types::ServerName;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::TlsMode;

const MAX_LINE: usize = 4096;
const MAX_LINES: usize = 100;
/// What the secured stream says first, in place of the greeting sent before STARTTLS.
const GREETING_AFTER_STARTTLS: &[u8] = b"220 ready after STARTTLS\r\n";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Protocol(String),
}

/// A connection to the SMTP server, plain or TLS, with bytes to read before the socket's.
#[derive(Debug)]
pub struct SmtpStream {
    inner: Inner,
    peer: SocketAddr,
    /// Read before anything from `inner` (the synthetic greeting after STARTTLS).
    pending: &'static [u8],
}

#[derive(Debug)]
enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connects to `host:port` and secures the connection as `mode` says with `tls`.
pub async fn connect(
    host: &str,
    port: u16,
    mode: TlsMode,
    tls: Option<Arc<rustls::ClientConfig>>,
    hello: &ClientId,
) -> Result<SmtpStream, ConnectError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| ConnectError::Connect(e.to_string()))?;
    let peer = tcp
        .peer_addr()
        .map_err(|e| ConnectError::Connect(e.to_string()))?;
    let (inner, pending) = match (mode, tls) {
        (TlsMode::None, _) | (_, None) => (Inner::Plain(tcp), &b""[..]),
        (TlsMode::Tls, Some(config)) => (handshake(tcp, host, config).await?, &b""[..]),
        (TlsMode::Starttls, Some(config)) => {
            let tcp = starttls(tcp, hello).await?;
            (handshake(tcp, host, config).await?, GREETING_AFTER_STARTTLS)
        }
    };
    Ok(SmtpStream {
        inner,
        peer,
        pending,
    })
}

async fn handshake(
    tcp: TcpStream,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Inner, ConnectError> {
    let name = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(name.to_owned())
        .map_err(|e| ConnectError::Tls(format!("{host:?} is not a host name or address: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    Ok(Inner::Tls(Box::new(tls)))
}

/// Greeting, EHLO, STARTTLS in plain text; returns the socket ready for the handshake.
async fn starttls(tcp: TcpStream, hello: &ClientId) -> Result<TcpStream, ConnectError> {
    let mut conn = BufReader::new(tcp);
    expect(&mut conn, "220", "greeting").await?;
    send(&mut conn, &format!("EHLO {hello}\r\n")).await?;
    let ehlo = expect(&mut conn, "250", "EHLO").await?;
    if !ehlo.iter().any(|l| {
        l.get(4..)
            .is_some_and(|k| k.trim().eq_ignore_ascii_case("STARTTLS"))
    }) {
        return Err(ConnectError::Protocol(
            "the server does not offer STARTTLS: set notify.email.tls to tls (port 465), or none on loopback".into(),
        ));
    }
    send(&mut conn, "STARTTLS\r\n").await?;
    expect(&mut conn, "220", "STARTTLS").await?;
    if !conn.buffer().is_empty() {
        return Err(ConnectError::Protocol(
            "the server sent data before the TLS handshake (a STARTTLS injection); not continuing"
                .into(),
        ));
    }
    Ok(conn.into_inner())
}

async fn send(conn: &mut BufReader<TcpStream>, line: &str) -> Result<(), ConnectError> {
    conn.get_mut()
        .write_all(line.as_bytes())
        .await
        .map_err(|e| ConnectError::Connect(e.to_string()))
}

/// Reads one reply (its lines, `NNN-...` up to `NNN ...`); it must have the code `want`.
async fn expect(
    conn: &mut BufReader<TcpStream>,
    want: &str,
    what: &str,
) -> Result<Vec<String>, ConnectError> {
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = (&mut *conn)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| ConnectError::Connect(e.to_string()))?;
        if n == 0 {
            return Err(ConnectError::Connect(format!(
                "the server closed the connection before its {what} reply"
            )));
        }
        if line.last() != Some(&b'\n') {
            return Err(ConnectError::Protocol(format!(
                "the server's {what} reply has a line longer than {MAX_LINE} bytes"
            )));
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let last = text.as_bytes().get(3) != Some(&b'-');
        if !text.starts_with(want) {
            let shown: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
            return Err(ConnectError::Protocol(format!(
                "the server answered {what} with {shown:?}, expected {want}"
            )));
        }
        lines.push(text);
        if last {
            return Ok(lines);
        }
        if lines.len() >= MAX_LINES {
            return Err(ConnectError::Protocol(format!(
                "the server's {what} reply has more than {MAX_LINES} lines"
            )));
        }
    }
}

impl AsyncRead for SmtpStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending = &self.pending[n..];
            return Poll::Ready(Ok(()));
        }
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SmtpStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncTokioStream for SmtpStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}
