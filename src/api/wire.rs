//! What the streams of the gRPC service yield: a `ProgressUpdate` whose bytes are
//! encoded once for every watcher of the update.
//!
//! A thousand watchers of one deployment receive the same update a thousand times. The
//! generated server (`crate::api::service`, see `build.rs`) is the Deployer service
//! with [`StreamedUpdate`] in place of `ProgressUpdate` in its two streams, so tonic's
//! prost encoder asks this type for its bytes: an update of a log is converted and
//! encoded by the first stream that sends it, and the other streams copy those bytes
//! ([`Update::encoded`]). A heartbeat, which is per stream, is encoded as usual. The
//! wire format is exactly `ProgressUpdate`'s; clients see no difference.

use std::sync::Arc;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};

use super::convert;
use crate::model::Update;
use crate::proto;

/// A message of an update stream.
#[derive(Debug)]
pub enum StreamedUpdate {
    /// An update of a deployment's log, shared by every stream that sends it.
    Logged(Arc<Update>),
    /// A stream's own heartbeat (not part of the log).
    Heartbeat(Box<proto::ProgressUpdate>),
}

impl StreamedUpdate {
    /// The message as a `ProgressUpdate` (for callers of the service in-process, such
    /// as the HTTP API).
    pub fn into_message(self) -> proto::ProgressUpdate {
        match self {
            StreamedUpdate::Logged(u) => convert::update(&u),
            StreamedUpdate::Heartbeat(m) => *m,
        }
    }

    /// The encoded `ProgressUpdate` of a logged update, made by the first caller.
    fn logged_bytes(u: &Update) -> &[u8] {
        u.encoded.get_or_init(|| convert::update(u).encode_to_vec())
    }
}

impl Default for StreamedUpdate {
    fn default() -> Self {
        StreamedUpdate::Heartbeat(Box::default())
    }
}

/// Encoding only: the server never decodes what it sends. Decoding reads a
/// `ProgressUpdate` into a heartbeat's box, so the type stays a complete `Message`.
impl Message for StreamedUpdate {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            StreamedUpdate::Logged(u) => buf.put_slice(Self::logged_bytes(u)),
            StreamedUpdate::Heartbeat(m) => m.encode_raw(buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if let StreamedUpdate::Logged(u) = self {
            *self = StreamedUpdate::Heartbeat(Box::new(convert::update(u)));
        }
        match self {
            StreamedUpdate::Heartbeat(m) => m.merge_field(tag, wire_type, buf, ctx),
            StreamedUpdate::Logged(_) => unreachable!("replaced above"),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            StreamedUpdate::Logged(u) => Self::logged_bytes(u).len(),
            StreamedUpdate::Heartbeat(m) => m.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = StreamedUpdate::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventKind;

    fn logged() -> Arc<Update> {
        let mut u = Update::for_test(7, false);
        u.metadata.insert("layer".into(), "sha256:ab".into());
        u.kind = EventKind::Progress;
        Arc::new(u)
    }

    #[test]
    fn a_logged_update_encodes_as_its_progress_update_and_only_once() {
        let u = logged();
        let direct = convert::update(&u).encode_to_vec();
        let first = StreamedUpdate::Logged(u.clone());
        assert_eq!(first.encoded_len(), direct.len());
        assert_eq!(
            first.encode_to_vec(),
            direct,
            "the same bytes as ProgressUpdate"
        );
        // The second stream copies the first one's bytes: the same allocation.
        let cached = u
            .encoded
            .get()
            .expect("encoded by the first stream")
            .as_ptr();
        let second = StreamedUpdate::Logged(u.clone());
        assert_eq!(second.encode_to_vec(), direct);
        assert_eq!(
            u.encoded.get().unwrap().as_ptr(),
            cached,
            "not encoded again"
        );
        // A copy of the update (to be changed) does not carry the bytes.
        assert!(Update::clone(&u).encoded.get().is_none());
        let decoded = proto::ProgressUpdate::decode(direct.as_slice()).unwrap();
        assert_eq!(decoded, StreamedUpdate::Logged(u).into_message());
    }

    #[test]
    fn a_heartbeat_encodes_as_itself_and_decodes_back() {
        let m = proto::ProgressUpdate {
            deployment_id: "d".into(),
            sequence: 3,
            heartbeat: true,
            ..Default::default()
        };
        let h = StreamedUpdate::Heartbeat(Box::new(m.clone()));
        let bytes = h.encode_to_vec();
        assert_eq!(bytes, m.encode_to_vec());
        let back = StreamedUpdate::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.into_message(), m);
        // A logged update decoded into keeps its fields where the bytes say nothing.
        let mut s = StreamedUpdate::Logged(logged());
        s.merge(bytes.as_slice()).unwrap();
        let merged = s.into_message();
        assert_eq!((merged.sequence, merged.heartbeat), (3, true));
        assert_eq!(merged.metadata["layer"], "sha256:ab");
    }
}
