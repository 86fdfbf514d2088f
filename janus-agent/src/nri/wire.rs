//! NRI's transport: ttrpc messages over one unix connection that carries two logical
//! connections (containerd/nri's `pkg/net/multiplex`). A frame is a 4-byte connection ID
//! and a 4-byte length, big-endian, then that many bytes of that connection's stream; a
//! ttrpc message in the stream is a 10-byte header (length, stream ID, type, flags) and a
//! protobuf body.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// The logical connection on which the runtime calls the plugin's service.
pub const PLUGIN_CONN: u32 = 1;
/// The logical connection on which the plugin calls the runtime's service.
pub const RUNTIME_CONN: u32 = 2;

/// ttrpc message types.
pub const REQUEST: u8 = 1;
pub const RESPONSE: u8 = 2;

const FRAME_HEADER: usize = 8;
const MESSAGE_HEADER: usize = 10;
/// ttrpc's largest message body.
const MESSAGE_MAX: usize = 4 << 20;
/// The largest frame sent: the runtime's ttrpc reads through a 4 KiB buffer, and its
/// multiplexer refuses (and closes everything on) a frame larger than the room left in it.
const FRAME_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the runtime's connection: {0}")]
    Io(#[from] io::Error),
    #[error("a message of {0} bytes; ttrpc allows at most {MESSAGE_MAX}")]
    TooLarge(usize),
    #[error("a message that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// One ttrpc message.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub stream: u32,
    pub kind: u8,
    pub body: Vec<u8>,
}

/// ttrpc's request envelope.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(string, tag = "1")]
    pub service: String,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
}

/// ttrpc's response envelope.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

/// `google.rpc.Status`: code 0 is success.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// gRPC's code for a method the server does not have.
pub const UNIMPLEMENTED: i32 = 12;

/// The connection to the runtime, and each logical connection's bytes not yet a whole
/// message.
pub struct Trunk {
    stream: UnixStream,
    pending: BTreeMap<u32, Vec<u8>>,
}

impl Trunk {
    pub fn new(stream: UnixStream) -> Trunk {
        Trunk {
            stream,
            pending: BTreeMap::new(),
        }
    }

    /// The next whole message, and the logical connection it came on.
    pub fn next(&mut self) -> Result<(u32, Message), WireError> {
        loop {
            for (conn, bytes) in &mut self.pending {
                if let Some(m) = take_message(bytes)? {
                    return Ok((*conn, m));
                }
            }
            let mut header = [0u8; FRAME_HEADER];
            self.stream.read_exact(&mut header)?;
            let conn = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(header[4..].try_into().expect("4 bytes")) as usize;
            if len > MESSAGE_HEADER + MESSAGE_MAX {
                return Err(WireError::TooLarge(len));
            }
            if conn != PLUGIN_CONN && conn != RUNTIME_CONN {
                // No one reads it (as the runtime's own multiplexer drops it): skipped, not
                // kept.
                io::copy(&mut (&self.stream).take(len as u64), &mut io::sink())?;
                continue;
            }
            let bytes = self.pending.entry(conn).or_default();
            let at = bytes.len();
            bytes.resize(at + len, 0);
            self.stream.read_exact(&mut bytes[at..])?;
        }
    }

    /// Sends `body` as one message on logical connection `conn`, in frames of at most
    /// [`FRAME_MAX`] bytes.
    pub fn send(&mut self, conn: u32, stream: u32, kind: u8, body: &[u8]) -> io::Result<()> {
        let mut message = Vec::with_capacity(MESSAGE_HEADER + body.len());
        message.extend((body.len() as u32).to_be_bytes());
        message.extend(stream.to_be_bytes());
        message.extend([kind, 0]);
        message.extend(body);
        let mut out =
            Vec::with_capacity(message.len() + FRAME_HEADER * message.len().div_ceil(FRAME_MAX));
        for chunk in message.chunks(FRAME_MAX) {
            out.extend(conn.to_be_bytes());
            out.extend((chunk.len() as u32).to_be_bytes());
            out.extend(chunk);
        }
        self.stream.write_all(&out)
    }
}

/// The first whole message in `bytes`, taken out of it.
fn take_message(bytes: &mut Vec<u8>) -> Result<Option<Message>, WireError> {
    if bytes.len() < MESSAGE_HEADER {
        return Ok(None);
    }
    let len = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    if len > MESSAGE_MAX {
        return Err(WireError::TooLarge(len));
    }
    if bytes.len() < MESSAGE_HEADER + len {
        return Ok(None);
    }
    let message = Message {
        stream: u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")),
        kind: bytes[8],
        body: bytes[MESSAGE_HEADER..MESSAGE_HEADER + len].to_vec(),
    };
    bytes.drain(..MESSAGE_HEADER + len);
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_across_frames_and_interleaved_are_whole_again() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut sender = Trunk::new(a);
        let mut receiver = Trunk::new(b);
        // One message in one frame, then one cut in three frames with another connection's
        // message between them, as a writer flushing part of a buffer would send.
        sender.send(RUNTIME_CONN, 1, RESPONSE, b"first").unwrap();
        let mut whole = Vec::new();
        whole.extend(5u32.to_be_bytes());
        whole.extend(3u32.to_be_bytes());
        whole.extend([REQUEST, 0]);
        whole.extend(b"cut!!");
        let mut raw = sender.stream.try_clone().unwrap();
        for (i, part) in [&whole[..4], &whole[4..12], &whole[12..]]
            .iter()
            .enumerate()
        {
            let mut frame = PLUGIN_CONN.to_be_bytes().to_vec();
            frame.extend((part.len() as u32).to_be_bytes());
            frame.extend(*part);
            raw.write_all(&frame).unwrap();
            if i == 0 {
                sender.send(RUNTIME_CONN, 3, RESPONSE, b"between").unwrap();
            }
        }
        let got: Vec<(u32, Message)> = (0..3).map(|_| receiver.next().unwrap()).collect();
        let message = |stream, kind, body: &[u8]| Message {
            stream,
            kind,
            body: body.to_vec(),
        };
        assert_eq!(
            got,
            [
                (RUNTIME_CONN, message(1, RESPONSE, b"first")),
                (RUNTIME_CONN, message(3, RESPONSE, b"between")),
                (PLUGIN_CONN, message(3, REQUEST, b"cut!!")),
            ]
        );
    }

    #[test]
    fn a_long_message_goes_in_small_frames_and_unknown_connections_are_skipped() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = a.try_clone().unwrap();
        // Frames for a connection nobody opened: read past, never kept.
        for _ in 0..3 {
            let mut frame = 7u32.to_be_bytes().to_vec();
            frame.extend(5u32.to_be_bytes());
            frame.extend(b"junk!");
            raw.write_all(&frame).unwrap();
        }
        let body = vec![7u8; 3 * FRAME_MAX];
        let mut sender = Trunk::new(a);
        sender.send(PLUGIN_CONN, 5, RESPONSE, &body).unwrap();
        drop(sender);
        drop(raw);
        // As the runtime's reader sees them: no frame over FRAME_MAX.
        let mut bytes = Vec::new();
        (&b).read_to_end(&mut bytes).unwrap();
        let mut rest = &bytes[3 * 13..];
        let mut frames = 0;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[4..8].try_into().unwrap()) as usize;
            assert!(len <= FRAME_MAX);
            rest = &rest[FRAME_HEADER + len..];
            frames += 1;
        }
        assert_eq!(frames, (MESSAGE_HEADER + body.len()).div_ceil(FRAME_MAX));
        let (mut w, r) = UnixStream::pair().unwrap();
        w.write_all(&bytes).unwrap();
        let mut receiver = Trunk::new(r);
        let (conn, message) = receiver.next().unwrap();
        assert_eq!((conn, message.stream, message.body), (PLUGIN_CONN, 5, body));
        assert!(receiver.pending.keys().all(|c| *c == PLUGIN_CONN));
    }

    #[test]
    fn a_message_longer_than_ttrpc_allows_is_refused_before_it_is_read() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = a;
        let mut frame = PLUGIN_CONN.to_be_bytes().to_vec();
        frame.extend((MESSAGE_HEADER as u32).to_be_bytes());
        frame.extend(u32::MAX.to_be_bytes());
        frame.extend([0, 0, 0, 1, REQUEST, 0]);
        raw.write_all(&frame).unwrap();
        let mut receiver = Trunk::new(b);
        assert!(matches!(receiver.next(), Err(WireError::TooLarge(_))));
        // A frame header announcing more than any message: refused too.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&PLUGIN_CONN.to_be_bytes()).unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(Trunk::new(b).next(), Err(WireError::TooLarge(_))));
    }
}
