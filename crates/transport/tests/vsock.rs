//! AF_VSOCK. There is no vsock loopback here, so these only check that
//! failures are clean errors within the timeout; they print "skipped: ..."
//! where the machine cannot do more.

use std::time::{Duration, Instant};

use transport::{Transport, TransportError};

#[tokio::test]
async fn dial_to_absent_vm_fails_cleanly_within_the_timeout() {
    let timeout = Duration::from_millis(500);
    let t = Transport::vsock(3);
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), t.dial(1234, timeout))
        .await
        .expect("dial ignored its timeout");
    let elapsed = start.elapsed();
    let err = match result {
        Ok(_) => {
            println!("skipped: something answered on vsock cid 3 port 1234");
            return;
        }
        Err(err) => err,
    };
    println!("dial error: {err}");
    assert!(
        elapsed < timeout + Duration::from_secs(2),
        "took {elapsed:?}"
    );
    match &err {
        TransportError::ConnectTimeout { port, .. } | TransportError::Refused { port, .. } => {
            assert_eq!(*port, 1234)
        }
        TransportError::Unsupported(msg) | TransportError::Io { context: msg, .. } => {
            assert!(msg.contains("1234"), "{err}")
        }
        other => panic!("unexpected error kind: {other:?}"),
    }
}

#[tokio::test]
async fn listen_works_or_fails_cleanly() {
    let t = Transport::vsock(3);
    match t.listen(0x4000_0123).await {
        Ok(listener) => {
            assert_eq!(listener.port(), 0x4000_0123);
            // The port is now taken.
            match t.listen(0x4000_0123).await {
                Err(TransportError::AddrInUse { port }) => assert_eq!(port, 0x4000_0123),
                other => panic!("second listen: {other:?}"),
            }
            drop(listener);
            // Dropping released it.
            t.listen(0x4000_0123).await.unwrap();
        }
        Err(err) => {
            println!("skipped: AF_VSOCK listen unavailable: {err}");
            assert!(
                matches!(
                    err,
                    TransportError::Unsupported(_) | TransportError::Io { .. }
                ),
                "{err:?}"
            );
        }
    }
}

#[test]
fn describe_names_the_peer() {
    assert_eq!(Transport::vsock(2).describe(), "vsock(peer cid 2)");
}
