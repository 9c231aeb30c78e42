//! The protobuf codec of the Deployer service (named in `build.rs` with
//! `codec_path`): tonic's prost codec with a smaller first encode buffer.
//!
//! tonic gives every response stream an encode buffer of 8 KiB when the stream
//! opens, and an open WatchDeployment stream holds it for its whole life, mostly idle.
//! An update is a few hundred bytes, so the buffer starts at [`ENCODE_BUFFER`] and
//! grows as needed (a large response only reserves more). The wire format is
//! prost's, unchanged.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// First capacity of a stream's encode buffer, in bytes.
pub const ENCODE_BUFFER: usize = 512;
/// tonic's default: encoded messages are handed to the connection at this size.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// tonic's `ProstCodec`, with an encode buffer that starts at [`ENCODE_BUFFER`].
#[derive(Debug)]
pub struct ProtoCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}
