//! Frames of the client protocol: a 4-byte big-endian length, then that many bytes of protobuf.
//!
//! Every read is bounded: a frame longer than the reader's limit is refused before its body is
//! read, so a peer cannot make us allocate more than the limit.

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("malformed protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a frame's length prefix. `Ok(None)`: the stream ended cleanly before a new frame.
/// A length over `limit` is an error: the caller must not read such a frame's body.
pub async fn read_len<R: AsyncRead + Unpin>(reader: &mut R, limit: usize) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = reader.read(&mut len[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(FrameError::Truncated) };
        }
        filled += n;
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    Ok(Some(size))
}

/// Reads a frame's body of `size` bytes (after [`read_len`]).
pub async fn read_body<R: AsyncRead + Unpin>(reader: &mut R, size: usize) -> Result<Bytes, FrameError> {
    let mut body = BytesMut::zeroed(size);
    reader.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(body.freeze())
}

/// Reads one frame. `Ok(None)`: the stream ended cleanly before a new frame began.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, limit: usize) -> Result<Option<Bytes>, FrameError> {
    match read_len(reader, limit).await? {
        None => Ok(None),
        Some(size) => Ok(Some(read_body(reader, size).await?)),
    }
}

/// Reads one frame and decodes it as `M`.
pub async fn read_message<M: Message + Default, R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<M>, FrameError> {
    match read_frame(reader, limit).await? {
        None => Ok(None),
        Some(bytes) => Ok(Some(M::decode(bytes)?)),
    }
}

/// Encodes `message` as one frame (length prefix included).
pub fn encode_frame<M: Message>(message: &M) -> Bytes {
    let mut buf = BytesMut::new();
    append_frame(&mut buf, message);
    buf.freeze()
}

/// Appends `message` as one frame to `buf` (to send several frames in one write).
pub fn append_frame<M: Message>(buf: &mut BytesMut, message: &M) {
    let len = message.encoded_len();
    buf.reserve(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a buffer with enough room cannot fail.
    message.encode(buf).expect("buffer has room for the message");
}

/// Takes the first whole frame's body off the front of `buf` (frames written with
/// [`append_frame`]); `None`, leaving `buf` as it was, when it holds no whole frame.
pub fn split_frame(buf: &mut Bytes) -> Option<Bytes> {
    let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    if buf.len() - 4 < len {
        return None;
    }
    let mut frame = buf.split_to(4 + len);
    Some(frame.split_off(4))
}

/// Writes `message` as one frame.
pub async fn write_message<M: Message, W: AsyncWrite + Unpin>(writer: &mut W, message: &M) -> std::io::Result<()> {
    writer.write_all(&encode_frame(message)).await
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::client::{Hello, Request, request};

    fn hello() -> Request {
        Request {
            kind: Some(request::Kind::Hello(Hello {
                client_name: "t".into(),
                access_token: "ann".into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn split_frame_takes_whole_frames_only() {
        let mut buf = BytesMut::new();
        append_frame(&mut buf, &hello());
        buf.extend_from_slice(&[0, 0, 0, 9, 1]);
        let mut buf = buf.freeze();
        let first = split_frame(&mut buf).expect("one whole frame");
        assert_eq!(<Request as Message>::decode(first).unwrap(), hello());
        assert_eq!(split_frame(&mut buf), None, "a frame cut short is left");
        assert_eq!(buf.len(), 5);
        assert_eq!(split_frame(&mut Bytes::from_static(&[0, 0])), None);
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        write_message(&mut buf, &hello()).await.unwrap();
        write_message(&mut buf, &hello()).await.unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_message::<Request, _>(&mut r, 1024).await.unwrap(), Some(hello()));
        assert_eq!(read_message::<Request, _>(&mut r, 1024).await.unwrap(), Some(hello()));
        assert_eq!(read_message::<Request, _>(&mut r, 1024).await.unwrap(), None);
    }

    #[tokio::test]
    async fn appended_frames_read_back_one_by_one() {
        let other = Request {
            kind: Some(request::Kind::Hello(Hello {
                client_name: "u".into(),
                access_token: "bo".into(),
                ..Default::default()
            })),
        };
        let mut buf = BytesMut::new();
        append_frame(&mut buf, &hello());
        append_frame(&mut buf, &other);
        assert_eq!(&buf[..], [encode_frame(&hello()), encode_frame(&other)].concat().as_slice());
        let mut r = &buf[..];
        assert_eq!(read_message::<Request, _>(&mut r, 1024).await.unwrap(), Some(hello()));
        assert_eq!(read_message::<Request, _>(&mut r, 1024).await.unwrap(), Some(other));
        assert_eq!(read_message::<Request, _>(&mut r, 1024).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_them() {
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(
            read_frame(&mut r, 1 << 20).await,
            Err(FrameError::TooLarge { size: 0xffff_ffff, limit: 0x10_0000 })
        ));
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(read_frame(&mut r, 100).await, Err(FrameError::Truncated)));
        let mut r: &[u8] = &[0, 0, 0, 5, 1];
        assert!(matches!(read_frame(&mut r, 100).await, Err(FrameError::Truncated)));
        let mut r: &[u8] = &[0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(read_message::<Request, _>(&mut r, 100).await, Err(FrameError::Decode(_))));
    }
}
