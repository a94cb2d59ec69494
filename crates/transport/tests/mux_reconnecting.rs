//! `Transport::mux_reconnecting`: dials follow whichever multiplexer session is current, as
//! the guest agent's do over a virtio-serial port whose host reconnects.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use transport::{MuxRole, MuxSession, Transport, TransportError};

const SAFETY: Duration = Duration::from_secs(30);

/// A fresh carrier: the host's transport, listening on `port`, and the guest's session.
async fn carrier(port: u32) -> (Transport, transport::Listener, MuxSession) {
    let (h, g) = UnixStream::pair().unwrap();
    let host = Transport::mux(MuxSession::new(h, MuxRole::Client));
    let listener = host.listen(port).await.unwrap();
    (host, listener, MuxSession::new(g, MuxRole::Server))
}

async fn echo_once(guest: &Transport, listener: &mut transport::Listener, msg: &[u8]) {
    let port = listener.port();
    let (dialed, accepted) = tokio::time::timeout(SAFETY, async {
        tokio::join!(guest.dial(port, Duration::from_secs(10)), listener.accept())
    })
    .await
    .expect("dial and accept in time");
    let (mut d, mut a) = (dialed.unwrap(), accepted.unwrap());
    d.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    a.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

#[tokio::test]
async fn dials_follow_the_current_session() {
    let (tx, rx) = watch::channel(None);
    let guest = Transport::mux_reconnecting(rx);
    assert!(guest.describe().contains("no session"));

    // No session: a dial waits out its timeout.
    let e = guest.dial(7, Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(e, TransportError::ConnectTimeout { .. }), "{e}");

    // A dial made while there is no session completes once one is published.
    let (host, mut listener, session) = carrier(7).await;
    let early = tokio::spawn({
        let guest = guest.clone();
        async move { guest.dial(7, Duration::from_secs(10)).await }
    });
    tokio::task::yield_now().await;
    tx.send_replace(Some(session.clone()));
    let (dialed, accepted) = tokio::join!(early, listener.accept());
    dialed.unwrap().unwrap();
    accepted.unwrap();
    echo_once(&guest, &mut listener, b"first").await;

    // The carrier ends (the host goes away): the session closes, and a new one takes over.
    drop((host, listener));
    tokio::time::timeout(SAFETY, session.closed())
        .await
        .expect("the old session closes");
    let (_host2, mut listener2, session2) = carrier(7).await;
    tx.send_replace(Some(session2));
    echo_once(&guest, &mut listener2, b"second").await;

    // The owner is gone: no session will come.
    drop(tx);
    let e = guest.dial(7, Duration::from_secs(1)).await;
    assert!(e.is_ok() || matches!(e, Err(TransportError::SessionClosed)));
}
