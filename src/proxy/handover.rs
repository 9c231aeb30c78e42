//! The hand-over of a running proxy's listening sockets to a new proxy (`stevedore proxy
//! --takeover`), so a proxy restart never closes a public port: no connection attempt is
//! refused and none completed by the kernel is reset. Like HAProxy's `-x` or Envoy's hot
//! restart.
//!
//! The running proxy listens on the hand-over socket, `<admin socket>.handover` (mode
//! 0600; a peer of another user is refused). The exchange, one JSON frame each way at
//! a time (a 4-byte big-endian length, then the JSON):
//!
//! 1. new → old `Hello { protocol, pid }`.
//! 2. The old proxy freezes its routes (a change waits) and answers `Offer { pid,
//!    routes, sockets }`: the route table and the role of each socket that follows
//!    (the hand-over socket, the admin socket, the metrics listener, each app's public
//!    listener). The sockets follow as SCM_RIGHTS messages (one byte each, at most
//!    [`FDS_PER_MESSAGE`] descriptors per message).
//! 3. The new proxy checks the routes against its own flags and writes them to its
//!    state file (the old one, frozen, writes nothing), prepares its listeners without
//!    accepting, and answers `Ready` (or `Abort { reason }`: the old one keeps serving).
//! 4. The old proxy marks itself handed over (the frozen changes and every later admin
//!    call get 503 and are sent again), stops accepting everywhere, answers `Done`,
//!    then forwards its open connections until they close or its drain timeout ends,
//!    and exits.
//! 5. On `Done` the new proxy starts accepting on the same sockets. Connection attempts
//!    in between wait in the listening sockets' queues, which never close.
//!
//! Every step has a time limit ([`STEP_TIMEOUT`]); a failure before `Done` leaves the
//! old proxy serving as before.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Error;
use super::forward::Proxy;
use super::routes::RouteTable;

/// Version of the exchange; a proxy refuses a `Hello` of another.
const PROTOCOL: u32 = 1;
/// Time limit of each step of the exchange (a frame or the sockets, either way).
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors per SCM_RIGHTS message (the kernel takes at most 253).
pub(crate) const FDS_PER_MESSAGE: usize = 200;
/// Largest frame accepted (a route table of many thousands of apps fits).
const MAX_FRAME: u32 = 64 << 20;

/// The hand-over socket of the proxy whose admin socket is `admin`.
pub(crate) fn socket_path(admin: &Path) -> PathBuf {
    let mut name = admin.as_os_str().to_owned();
    name.push(".handover");
    PathBuf::from(name)
}

/// What a socket sent in a hand-over is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    Handover,
    Admin,
    Metrics,
    /// The public listener of this app.
    App(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum NewSays {
    Hello { protocol: u32, pid: u32 },
    Ready,
    Abort { reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OldSays {
    Offer {
        pid: u32,
        routes: RouteTable,
        sockets: Vec<Role>,
    },
    Refused {
        reason: String,
    },
    Done,
}

fn write_frame<T: Serialize>(stream: &mut UnixStream, message: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(&bytes)
}

fn read_frame<T: DeserializeOwned>(stream: &mut UnixStream) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    stream.read_exact(&mut bytes)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Sends `fds` over `stream`, [`FDS_PER_MESSAGE`] at a time, each batch with one byte.
pub(crate) fn send_fds(stream: &UnixStream, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(batch.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(batch)) {
            return Err(std::io::Error::other("descriptors do not fit the message"));
        }
        let sent = rustix::net::sendmsg(
            stream,
            &[IoSlice::new(b"F")],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != 1 {
            return Err(std::io::Error::other("descriptor message not sent"));
        }
    }
    Ok(())
}

/// Receives `count` descriptors sent by [`send_fds`] (close-on-exec).
pub(crate) fn recv_fds(stream: &UnixStream, count: usize) -> std::io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let batch = (count - fds.len()).min(FDS_PER_MESSAGE);
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(batch))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let got = rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if got.bytes == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} of {count} sockets", fds.len()),
            ));
        }
        if got.flags.contains(ReturnFlags::CTRUNC) {
            return Err(std::io::Error::other("socket descriptors were truncated"));
        }
        let before = fds.len();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if fds.len() == before {
            return Err(std::io::Error::other(
                "a descriptor message without descriptors",
            ));
        }
    }
    if fds.len() != count {
        return Err(std::io::Error::other(format!(
            "{} sockets received, {count} announced",
            fds.len()
        )));
    }
    Ok(fds)
}

fn with_timeouts(stream: &UnixStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))
}

// --- the running (old) proxy's side ------------------------------------------------

/// The running proxy's own listening sockets (not the apps'), kept to be sent.
pub(crate) struct OwnSockets {
    pub(crate) handover: OwnedFd,
    pub(crate) admin: OwnedFd,
    pub(crate) metrics: OwnedFd,
}

/// Serves hand-over requests on `listener` until `stop`. A successful hand-over
/// cancels `handed_over`: the caller then stops accepting and drains.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    proxy: Proxy,
    own: OwnSockets,
    stop: tokio_util::sync::CancellationToken,
    handed_over: tokio_util::sync::CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match give(stream, &proxy, &own).await {
            Ok(pid) => {
                tracing::info!(
                    new_pid = pid,
                    "handed over: the new proxy accepts on every socket; this one stops accepting"
                );
                handed_over.cancel();
                return;
            }
            Err(e) => tracing::error!(error = %e, "hand-over failed; this proxy keeps serving"),
        }
    }
}

/// One hand-over request; the new proxy's pid once it took over.
async fn give(
    stream: tokio::net::UnixStream,
    proxy: &Proxy,
    own: &OwnSockets,
) -> Result<u32, Error> {
    let peer = stream.peer_cred()?;
    let me = rustix::process::geteuid().as_raw();
    if peer.uid() != me && peer.uid() != 0 {
        return Err(format!(
            "refused a hand-over request of uid {} (this proxy runs as uid {me})",
            peer.uid()
        )
        .into());
    }
    let mut stream = stream.into_std()?;
    with_timeouts(&stream)?;
    let (hello, returned) = tokio::task::spawn_blocking(move || {
        let hello = read_frame::<NewSays>(&mut stream);
        (hello, stream)
    })
    .await?;
    let mut stream = returned;
    let new_pid = match hello? {
        NewSays::Hello { protocol, pid } if protocol == PROTOCOL => pid,
        NewSays::Hello { protocol, .. } => {
            let reason =
                format!("hand-over protocol {protocol} asked, this proxy speaks {PROTOCOL}");
            let _ = write_frame(
                &mut stream,
                &OldSays::Refused {
                    reason: reason.clone(),
                },
            );
            return Err(reason.into());
        }
        other => return Err(format!("expected a hello, got {other:?}").into()),
    };
    tracing::info!(
        new_pid,
        "hand-over requested; route changes wait until it ends"
    );
    let frozen = match proxy.freeze().await {
        Ok(f) => f,
        Err(e) => {
            let _ = write_frame(
                &mut stream,
                &OldSays::Refused {
                    reason: e.to_string(),
                },
            );
            return Err(e.into());
        }
    };
    let routes = frozen.table();
    let mut roles = vec![Role::Handover, Role::Admin, Role::Metrics];
    let mut fds = vec![
        own.handover.try_clone()?,
        own.admin.try_clone()?,
        own.metrics.try_clone()?,
    ];
    for (app, fd) in frozen.listeners()? {
        roles.push(Role::App(app));
        fds.push(fd);
    }
    let (sockets, route_count) = (fds.len(), routes.routes.len());
    let offer = OldSays::Offer {
        pid: std::process::id(),
        routes,
        sockets: roles,
    };
    let (answer, mut stream) = tokio::task::spawn_blocking(move || {
        let answer = (|| {
            write_frame(&mut stream, &offer)?;
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            send_fds(&stream, &borrowed)?;
            read_frame::<NewSays>(&mut stream)
        })();
        (answer, stream)
    })
    .await?;
    tracing::info!(
        new_pid,
        sockets,
        routes = route_count,
        "hand-over: listening sockets and routes sent"
    );
    match answer {
        Ok(NewSays::Ready) => {}
        Ok(NewSays::Abort { reason }) => {
            return Err(format!("the new proxy (pid {new_pid}) gave up: {reason}").into());
        }
        Ok(other) => return Err(format!("expected ready, got {other:?}").into()),
        Err(e) => {
            return Err(format!("the new proxy (pid {new_pid}) did not answer: {e}").into());
        }
    }
    tracing::info!(new_pid, "hand-over: the new proxy is ready");
    frozen.hand_over();
    // The new proxy starts accepting on `Done`; if it is gone by now, the sockets die
    // with this process's copies when it exits (nothing else can be done).
    if let Err(e) = write_frame(&mut stream, &OldSays::Done) {
        tracing::error!(new_pid, error = %e, "hand-over: could not confirm to the new proxy");
    }
    Ok(new_pid)
}

// --- the new proxy's side ------------------------------------------------------------

/// What a running proxy handed over, before the new one confirmed it is ready.
pub(crate) struct Offered {
    stream: UnixStream,
    pub(crate) old_pid: u32,
    pub(crate) routes: RouteTable,
    pub(crate) sockets: Vec<(Role, OwnedFd)>,
}

/// Asks the proxy on `path` for its sockets. `Ok(None)` when no proxy answers there
/// (no socket file, or nobody listening on it).
pub(crate) async fn request(path: &Path) -> Result<Option<Offered>, Error> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot connect to {}: {e}", path.display()).into()),
    };
    let offered = tokio::task::spawn_blocking(move || -> Result<Offered, Error> {
        let mut stream = stream;
        with_timeouts(&stream)?;
        let hello = NewSays::Hello {
            protocol: PROTOCOL,
            pid: std::process::id(),
        };
        write_frame(&mut stream, &hello)?;
        let (old_pid, routes, roles) = match read_frame::<OldSays>(&mut stream)? {
            OldSays::Offer {
                pid,
                routes,
                sockets,
            } => (pid, routes, sockets),
            OldSays::Refused { reason } => {
                return Err(format!("the running proxy refused: {reason}").into());
            }
            OldSays::Done => return Err("expected an offer, got done".into()),
        };
        let fds = recv_fds(&stream, roles.len())?;
        Ok(Offered {
            stream,
            old_pid,
            routes,
            sockets: roles.into_iter().zip(fds).collect(),
        })
    })
    .await??;
    Ok(Some(offered))
}

impl Offered {
    /// Tells the old proxy this one is ready and waits until it stopped accepting.
    pub(crate) async fn ready(self) -> Result<(), Error> {
        let mut stream = self.stream;
        let old_pid = self.old_pid;
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            write_frame(&mut stream, &NewSays::Ready)?;
            match read_frame::<OldSays>(&mut stream) {
                Ok(OldSays::Done) => Ok(()),
                Ok(other) => Err(format!("expected done, got {other:?}").into()),
                Err(e) => Err(format!(
                    "the old proxy (pid {old_pid}) did not confirm the hand-over: {e}; check whether it still serves"
                )
                .into()),
            }
        })
        .await?
    }

    /// Gives up: the old proxy keeps serving. The sockets received are closed here
    /// (the old proxy's copies keep them open).
    pub(crate) fn abort(self, reason: &str) {
        let mut stream = self.stream;
        let abort = NewSays::Abort {
            reason: reason.to_owned(),
        };
        if let Err(e) = write_frame(&mut stream, &abort) {
            tracing::warn!(error = %e, "could not tell the old proxy the hand-over is off");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_a_socket_pair_in_batches() {
        let (a, b) = UnixStream::pair().unwrap();
        // More than one batch, so the batching is exercised.
        let listeners: Vec<std::net::TcpListener> = (0..FDS_PER_MESSAGE + 3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = listeners.iter().map(|l| l.as_fd()).collect();
        let sender = std::thread::spawn({
            let fds: Vec<OwnedFd> = borrowed
                .iter()
                .map(|f| f.try_clone_to_owned().unwrap())
                .collect();
            move || {
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                send_fds(&a, &borrowed).unwrap();
            }
        });
        let received: Vec<std::net::TcpListener> = recv_fds(&b, listeners.len())
            .unwrap()
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect();
        sender.join().unwrap();
        for (got, original) in received.iter().zip(&listeners) {
            assert_eq!(got.local_addr().unwrap(), original.local_addr().unwrap());
        }
        // The same listening socket: with the original closed, a connection to its
        // address is accepted on the received copy.
        let addr = listeners[7].local_addr().unwrap();
        drop(listeners);
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (_conn, peer) = received[7].accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_frame(
            &mut a,
            &NewSays::Hello {
                protocol: PROTOCOL,
                pid: 7,
            },
        )
        .unwrap();
        match read_frame::<NewSays>(&mut b).unwrap() {
            NewSays::Hello { protocol, pid } => assert_eq!((protocol, pid), (PROTOCOL, 7)),
            other => panic!("{other:?}"),
        }
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).unwrap();
        let err = read_frame::<NewSays>(&mut b).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn the_handover_socket_sits_beside_the_admin_socket() {
        assert_eq!(
            socket_path(Path::new("/run/stevedore/proxy.sock")),
            PathBuf::from("/run/stevedore/proxy.sock.handover")
        );
    }
}
