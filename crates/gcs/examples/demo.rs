//! ferry's main job on its embedded default, end to end, with no hypervisor: start the guest
//! agent standalone on the hybrid-vsock transport, run a container in it, exec into it, break
//! the host connection mid-run (as a host restart or a live migration would), reconnect, and
//! collect the exit code that happened while nobody was connected.
//!
//! Run it with `bash scripts/demo.sh` (root gives a real container in its own namespaces;
//! without root, or without busybox, the workload runs directly in the "UVM").

#[path = "../tests/support/mod.rs"]
mod support;

use bridge::UVM_CONTAINER_ID;
use bridge::message::*;
use support::*;
use tokio::io::AsyncBufReadExt;

const WORKLOAD: &str = "echo \"hello from $(hostname), I am pid $$\"; \
    i=1; while [ $i -le 20 ]; do echo \"tick $i\"; i=$((i+1)); sleep 0.1; done; exit 3";

#[tokio::main]
async fn main() {
    println!("== starting ferry-gcs ({})", gcs_binary().display());
    let mut gcs = Gcs::start("demo").await;
    let conn = gcs.connect().await;
    println!(
        "   connected over hybrid vsock at {}, protocol v4 negotiated",
        gcs.dir.0.join("vm.sock").display()
    );

    let in_container = nix::unistd::geteuid().is_root() && busybox().is_some();
    let (target, pid, mut io) = if in_container {
        let rootfs = busybox_rootfs(&gcs.dir.0);
        let spec = container_spec(&rootfs, &["sh", "-c", WORKLOAD], false);
        ok(&gcs.create_container(&conn, "demo", spec).await);
        println!("== container \"demo\" created (busybox root, own pid/mount/uts/ipc namespaces)");
        let params = ProcessParameters {
            create_std_out_pipe: true,
            ..Default::default()
        };
        let (resp, io) = gcs
            .exec_raw(&conn, "demo", params, (false, true, false))
            .await;
        ok(&resp);
        let Response::ExecuteProcess(e) = resp else {
            unreachable!()
        };
        ("demo", e.process_id, io)
    } else {
        println!("== not root or no busybox: running the workload directly in the UVM");
        let (pid, io) = gcs
            .exec_uvm(&conn, &["sh", "-c", WORKLOAD], (false, true, false))
            .await;
        (UVM_CONTAINER_ID, pid, io)
    };
    println!("   init process started: pid {pid} (as seen by the agent)");

    // Stream the workload's output as it comes.
    let stdout = io.stdout.take().expect("stdout");
    let printer = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut n = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            println!("   [{target}] {line}");
            n += 1;
        }
        n
    });

    if in_container {
        let exec = ProcessParameters {
            oci_process: Some(Box::new(
                serde_json::from_value(serde_json::json!({
                    "user": {"uid": 0, "gid": 0},
                    "args": ["ps"],
                    "env": ["PATH=/bin"],
                    "cwd": "/"
                }))
                .expect("process spec"),
            )),
            create_std_out_pipe: true,
            ..Default::default()
        };
        let (resp, mut eio) = gcs
            .exec_raw(&conn, "demo", exec, (false, true, false))
            .await;
        ok(&resp);
        let out = read_all(eio.stdout.as_mut().expect("stdout")).await;
        println!("== exec `ps` inside the container:");
        for l in String::from_utf8_lossy(&out).lines() {
            println!("   | {l}");
        }
    }

    // Ask for the exit, then drop the connection: the answer must survive.
    let (wait_id, _) = conn
        .send(&wait_req(target, pid, bridge::INFINITE_WAIT))
        .await;
    println!("== WaitForProcess sent as request id {wait_id}; now dropping the host connection");
    drop(conn);

    let lines = printer.await.expect("printer");
    println!("== the workload finished while no host was connected ({lines} lines, none lost)");

    let conn = gcs.accept().await;
    let adopted = conn.expect(wait_id);
    conn.negotiate().await;
    println!("== reconnected and negotiated again; adopted wait id {wait_id}");
    let code = match within("the adopted wait", adopted).await {
        Ok(Response::WaitForProcess(w)) => w.exit_code,
        other => panic!("unexpected {other:?}"),
    };
    println!("   exit code delivered after the reconnect: {code}");
    if in_container {
        let n = conn.next_notification().await;
        println!(
            "   queued container notification: {} {} (result {})",
            n.base.container_id, n.kind, n.result
        );
    }
    ok(&conn
        .call(Request::ShutdownForced(BaseRequest {
            base: base(UVM_CONTAINER_ID),
        }))
        .await);
    println!(
        "== utility VM shut down. Agent log: {}",
        gcs.dir.0.join("gcs.log").display()
    );
    assert_eq!(code, 3, "the workload exits 3");
    println!("demo OK");
}
