//! The replication protocol over TCP with tokio: the handshake with
//! timeouts, then reading and writing sealed records on the two halves of
//! the connection (one task each).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::protocol::{
    body_len, ClientHandshake, ClientHello, Message, Opener, PreSharedKey, ProtocolError, Sealer,
    ServerHandshake, ServerHello, AUTH_LEN, HELLO_LEN, SERVER_HELLO_LEN,
};

/// How long each handshake step may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the transport: the connection is unusable afterwards.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting, reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// A handshake step took too long.
    #[error("the peer did not answer the handshake within {0:?}")]
    Timeout(Duration),
    /// No byte arrived from the peer for this long.
    #[error("no data from the peer for {0:?}")]
    Idle(Duration),
    /// The peer broke the protocol (or is not simrep, or has another key).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Closed
        } else {
            TransportError::Io { what, source }
        }
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| TransportError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// An authenticated connection, split for a reader and a writer task.
#[derive(Debug)]
pub struct Connection {
    /// Reads and opens records.
    pub reader: RecordReader<tokio::net::tcp::OwnedReadHalf>,
    /// Seals and writes records.
    pub writer: RecordWriter<tokio::net::tcp::OwnedWriteHalf>,
    /// The peer's address.
    pub peer: SocketAddr,
}

/// The primary's side: connects to `addr` and authenticates both ways.
///
/// # Errors
///
/// [`TransportError`]: refused, timed out, wrong key, wrong version, busy.
pub async fn connect(addr: SocketAddr, key: PreSharedKey) -> Result<Connection, TransportError> {
    let stream = timed(async {
        TcpStream::connect(addr)
            .await
            .map_err(io("connecting to the backup"))
    })
    .await?;
    stream.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
    client_handshake(stream, key).await
}

/// Runs the primary's handshake on a connected stream.
///
/// # Errors
///
/// As [`connect`].
pub async fn client_handshake(
    mut stream: TcpStream,
    key: PreSharedKey,
) -> Result<Connection, TransportError> {
    let peer = stream.peer_addr().map_err(io("peer address"))?;
    let (hs, hello) = ClientHandshake::start(key)?;
    timed(async {
        stream
            .write_all(&hello.encode())
            .await
            .map_err(io("sending the hello"))?;
        let mut reply = [0u8; SERVER_HELLO_LEN];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(io("reading the backup's hello"))?;
        let reply = ServerHello::decode(&reply)?;
        let (proof, session) = hs.finish(&reply)?;
        stream
            .write_all(&proof)
            .await
            .map_err(io("sending the proof"))?;
        Ok(split(stream, session, peer))
    })
    .await
}

/// The backup's side: authenticates a primary that connected.
///
/// # Errors
///
/// [`TransportError`]; on a version mismatch the primary is told before
/// the connection closes.
pub async fn accept(
    mut stream: TcpStream,
    key: PreSharedKey,
) -> Result<Connection, TransportError> {
    let peer = stream.peer_addr().map_err(io("peer address"))?;
    stream.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
    timed(async {
        let mut hello = [0u8; HELLO_LEN];
        stream
            .read_exact(&mut hello)
            .await
            .map_err(io("reading the primary's hello"))?;
        let hello = ClientHello::decode(&hello)?;
        let hs = match ServerHandshake::accept(key, &hello) {
            Ok((hs, reply)) => {
                stream
                    .write_all(&reply.encode())
                    .await
                    .map_err(io("sending the hello"))?;
                hs
            }
            Err((e, reply)) => {
                if let Some(reply) = reply {
                    let _ = stream.write_all(&reply.encode()).await;
                }
                return Err(e.into());
            }
        };
        let mut proof = [0u8; AUTH_LEN];
        stream
            .read_exact(&mut proof)
            .await
            .map_err(io("reading the primary's proof"))?;
        let session = hs.finish(&proof)?;
        Ok(split(stream, session, peer))
    })
    .await
}

/// Tells a primary that this backup is busy, and closes.
pub async fn refuse_busy(mut stream: TcpStream) {
    let mut hello = [0u8; HELLO_LEN];
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        if stream.read_exact(&mut hello).await.is_ok() {
            let _ = stream.write_all(&ServerHandshake::busy().encode()).await;
        }
    })
    .await;
}

fn split(stream: TcpStream, session: super::protocol::Session, peer: SocketAddr) -> Connection {
    let (sealer, opener) = session.split();
    let (r, w) = stream.into_split();
    Connection {
        reader: RecordReader::new(r, opener),
        writer: RecordWriter::new(w, sealer),
        peer,
    }
}

/// Reads records from one half of a connection.
#[derive(Debug)]
pub struct RecordReader<R> {
    inner: R,
    opener: Opener,
    buf: Vec<u8>,
    bytes: u64,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R, opener: Opener) -> Self {
        RecordReader {
            inner,
            opener,
            buf: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes received so far (record prefixes included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// [`RecordReader::next`], failing with [`TransportError::Idle`] when
    /// no byte arrives for `idle` (a large record on a slow link is fine as
    /// long as its bytes keep coming).
    ///
    /// # Errors
    ///
    /// [`TransportError`]; the connection must be dropped afterwards.
    pub async fn next_idle(&mut self, idle: Duration) -> Result<Message, TransportError> {
        let mut prefix = [0u8; 4];
        read_idle(&mut self.inner, &mut prefix, idle).await?;
        let len = body_len(prefix)?;
        self.buf.resize(len, 0);
        read_idle(&mut self.inner, &mut self.buf, idle).await?;
        self.bytes += 4 + len as u64;
        Ok(self.opener.open(prefix, &self.buf)?)
    }

    /// Reads, authenticates and decodes the next message. The length is
    /// checked before the body is read, so a hostile peer cannot make the
    /// reader allocate more than one maximal record.
    ///
    /// # Errors
    ///
    /// [`TransportError`]; the connection must be dropped afterwards.
    pub async fn next(&mut self) -> Result<Message, TransportError> {
        let mut prefix = [0u8; 4];
        self.inner
            .read_exact(&mut prefix)
            .await
            .map_err(io("reading a record"))?;
        let len = body_len(prefix)?;
        self.buf.resize(len, 0);
        self.inner
            .read_exact(&mut self.buf)
            .await
            .map_err(io("reading a record"))?;
        self.bytes += 4 + len as u64;
        Ok(self.opener.open(prefix, &self.buf)?)
    }
}

/// Fills `buf`, allowing at most `idle` between bytes.
async fn read_idle<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    idle: Duration,
) -> Result<(), TransportError> {
    let mut filled = 0;
    while filled < buf.len() {
        match tokio::time::timeout(idle, r.read(&mut buf[filled..])).await {
            Err(_) => return Err(TransportError::Idle(idle)),
            Ok(Ok(0)) => return Err(TransportError::Closed),
            Ok(Ok(n)) => filled += n,
            Ok(Err(e)) => return Err(io("reading a record")(e)),
        }
    }
    Ok(())
}

/// Writes records to one half of a connection.
#[derive(Debug)]
pub struct RecordWriter<W> {
    inner: W,
    sealer: Sealer,
    buf: Vec<u8>,
    bytes: u64,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W, sealer: Sealer) -> Self {
        RecordWriter {
            inner,
            sealer,
            buf: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes sent so far (record prefixes included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Seals and sends one message.
    ///
    /// # Errors
    ///
    /// [`TransportError`]; the connection must be dropped afterwards.
    pub async fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        self.buf.clear();
        self.sealer.seal(msg, &mut self.buf)?;
        self.inner
            .write_all(&self.buf)
            .await
            .map_err(io("sending a record"))?;
        self.bytes += self.buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn key(s: &str) -> PreSharedKey {
        PreSharedKey::new(s.as_bytes()).unwrap()
    }

    async fn pair(
        kp: &'static str,
        kb: &'static str,
    ) -> (
        Result<Connection, TransportError>,
        Result<Connection, TransportError>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let backup = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            accept(s, key(kb)).await
        });
        let primary = connect(addr, key(kp)).await;
        (primary, backup.await.unwrap())
    }

    #[tokio::test]
    async fn messages_flow_both_ways_over_tcp() {
        let (p, b) = pair("0123456789abcdef", "0123456789abcdef").await;
        let (mut p, mut b) = (p.unwrap(), b.unwrap());
        let big = Message::EpochData(super::super::protocol::EpochData {
            epoch: 1,
            chunk: 0,
            data: vec![7; 3 << 20],
        });
        p.writer.send(&big).await.unwrap();
        assert_eq!(b.reader.next().await.unwrap(), big);
        b.writer.send(&Message::Ack { epoch: 1 }).await.unwrap();
        assert_eq!(p.reader.next().await.unwrap(), Message::Ack { epoch: 1 });
        drop(p);
        assert!(matches!(b.reader.next().await, Err(TransportError::Closed)));
    }

    #[tokio::test]
    async fn a_wrong_key_fails_the_handshake_on_both_sides() {
        let (p, b) = pair("0123456789abcdef", "fedcba9876543210").await;
        assert!(matches!(
            p,
            Err(TransportError::Protocol(ProtocolError::AuthFailed {
                peer: "backup"
            }))
        ));
        // The primary closes without sending its proof.
        assert!(b.is_err());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_hello_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            accept(s, key("0123456789abcdef")).await
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x47; HELLO_LEN]).await.unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(TransportError::Protocol(ProtocolError::BadMagic))
        ));
    }
}
