//! Framing of the guest protocol: a 4-byte big-endian length, then that many bytes
//! of protobuf. The reader bounds the length before allocating, so a guest that
//! sends garbage gets a clear error, not an out-of-memory.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame the host accepts from a guest (which it does not trust).
pub const MAX_FRAME: usize = 1024 * 1024;
/// Largest frame a guest accepts from the host: a `Start` carries the whole
/// command and environment (an agent config and a run request, each up to the
/// gateway's body limit).
pub const MAX_HOST_FRAME: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("frame is not a valid message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream error")]
    Io(#[from] std::io::Error),
}

/// Writes one message as a frame.
pub async fn write<M: Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_HOST_FRAME {
        return Err(FrameError::TooLarge(len, MAX_HOST_FRAME));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(
        &u32::try_from(len)
            .map_err(|_| FrameError::TooLarge(len, MAX_HOST_FRAME))?
            .to_be_bytes(),
    );
    msg.encode(&mut buf)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one message of at most [`MAX_FRAME`] bytes (the host, from a guest);
/// `Ok(None)` at a clean end of stream (between frames).
pub async fn read<M: Message + Default, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<M>, FrameError> {
    read_limited(r, MAX_FRAME).await
}

/// [`read`] of frames up to [`MAX_HOST_FRAME`] (a guest, from the host).
pub async fn read_from_host<M: Message + Default, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<M>, FrameError> {
    read_limited(r, MAX_HOST_FRAME).await
}

async fn read_limited<M: Message + Default, R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Option<M>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge(len, limit));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(M::decode(body.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{GuestMessage, Pong, guest_message};

    fn pong(nonce: u64) -> GuestMessage {
        GuestMessage {
            kind: Some(guest_message::Kind::Pong(Pong { nonce })),
        }
    }

    #[tokio::test]
    async fn round_trip_and_clean_end() {
        let mut buf = Vec::new();
        write(&mut buf, &pong(1)).await.expect("write");
        write(&mut buf, &pong(2)).await.expect("write");
        let mut r = buf.as_slice();
        assert_eq!(
            read::<GuestMessage, _>(&mut r).await.expect("read"),
            Some(pong(1))
        );
        assert_eq!(
            read::<GuestMessage, _>(&mut r).await.expect("read"),
            Some(pong(2))
        );
        assert_eq!(read::<GuestMessage, _>(&mut r).await.expect("end"), None);
    }

    #[tokio::test]
    async fn garbage_is_a_clear_error() {
        let huge = (u32::MAX).to_be_bytes();
        let err = read::<GuestMessage, _>(&mut huge.as_slice())
            .await
            .expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge(_, MAX_FRAME)), "{err}");
        // A guest accepts the host's larger frames; the host does not accept them
        // from a guest.
        let two_mib = u32::try_from(2 * MAX_FRAME).expect("fits").to_be_bytes();
        let err = read::<GuestMessage, _>(&mut two_mib.as_slice())
            .await
            .expect_err("too large from a guest");
        assert!(matches!(err, FrameError::TooLarge(_, MAX_FRAME)), "{err}");
        let err = read_from_host::<GuestMessage, _>(&mut two_mib.as_slice())
            .await
            .expect_err("truncated, not too large");
        assert!(matches!(err, FrameError::Truncated), "{err}");
        let cut = [0u8, 0, 0, 10, 1, 2];
        let err = read::<GuestMessage, _>(&mut cut.as_slice())
            .await
            .expect_err("truncated");
        assert!(matches!(err, FrameError::Truncated), "{err}");
        let half_len = [0u8, 0];
        let err = read::<GuestMessage, _>(&mut half_len.as_slice())
            .await
            .expect_err("truncated");
        assert!(matches!(err, FrameError::Truncated));
        let bad = [0u8, 0, 0, 3, 0xff, 0xff, 0xff];
        let err = read::<GuestMessage, _>(&mut bad.as_slice())
            .await
            .expect_err("decode");
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }
}
