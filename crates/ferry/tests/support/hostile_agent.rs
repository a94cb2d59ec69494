//! A guest agent that misbehaves on purpose, for testing the real host against it.
//!
//! The test binary runs as this agent when [`ROLE_ENV`] is set: the shim starts it in place of
//! `ferry gcs` (`FERRY_GCS_PROGRAM`), with the agent's usual arguments. It dials the bridge
//! over hybrid vsock as the real agent does, answers the negotiation (honestly, or with a lie
//! chosen by [`NEGOTIATION_ENV`]), and then serves just enough of the protocol for `ferry run`
//! to work. The container id of a `ferry run` picks a misbehaviour, done when its Create
//! request arrives, before the answer (so the host has read all of it once `ferry run`
//! returns):
//!
//! * `flood`: notifications by the hundred thousand, for unknown containers and for the one
//!   being created (some near the frame limit in size);
//! * `strays`: responses to ids never asked, a response of the wrong type for the pending
//!   Create, requests from the guest, response bodies that are not JSON;
//! * `ports`: dials stdio ports the host never gave out;
//! * `wrongports`: answers its ExecuteProcess but dials other ports than the given ones;
//! * `redial`: dials the bridge thousands of times more;
//! * `oversize` / `undersize`: a header whose size is over the limit (1 GiB, followed by a
//!   little of that body and silence) / under the 16-byte header;
//! * `halfframe`: half of a frame, then silence (it keeps reading, never writes again).
//!
//! What it does is reported, one line per event (`<uvm> <event> [details]`), on the Unix
//! socket named by [`EVENTS_ENV`], so the test waits for signals rather than sleeping.

use bridge::{BRIDGE_PORT, FIRST_STDIO_PORT, Frame, HEADER_SIZE, Header, Identifier, Rpc};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

/// Set (to anything) in the environment of a hostile UVM's `ferry uvm start`: the test binary
/// then runs as the agent.
pub const ROLE_ENV: &str = "FERRY_HOSTILE_AGENT";
/// How to answer the negotiation: `honest` (default), `version-5` (claims a version the host
/// did not offer), `garbage` (a successful answer whose capabilities are not an object).
pub const NEGOTIATION_ENV: &str = "FERRY_HOSTILE_NEGOTIATION";
/// The Unix socket the agent reports its events on.
pub const EVENTS_ENV: &str = "FERRY_HOSTILE_EVENTS";

/// Flood sizes.
pub const FAT_NOTIFICATIONS: usize = 1_500;
pub const KNOWN_NOTIFICATIONS: usize = 20_000;
pub const UNKNOWN_NOTIFICATIONS: usize = 100_000;
pub const STRAY_RESPONSES: usize = 50_000;
pub const GUEST_REQUESTS: usize = 1_000;
pub const BRIDGE_DIALS: usize = 5_000;

/// Runs the agent; never returns.
pub fn main() -> ! {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hostile agent: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .iter()
        .position(|a| a == "--base")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .ok_or("no --base argument")?;
    // <state>/uvms/<name>/vm.sock
    let name = base
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let events =
        std::env::var_os(EVENTS_ENV).and_then(|p| std::os::unix::net::UnixStream::connect(p).ok());
    let mut agent = Agent {
        base,
        name,
        negotiation: std::env::var(NEGOTIATION_ENV).unwrap_or_else(|_| "honest".into()),
        events,
        next_pid: 100,
        wrong_ports: false,
    };
    agent.event(&format!("pid {}", std::process::id()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(agent.serve())
}

struct Agent {
    base: PathBuf,
    name: String,
    negotiation: String,
    events: Option<std::os::unix::net::UnixStream>,
    next_pid: u32,
    /// The next ExecuteProcess dials other ports than the ones it gives.
    wrong_ports: bool,
}

/// What serving one connection came to.
enum End {
    /// The host closed the bridge.
    Closed,
    /// The host asked the UVM to shut down.
    Shutdown,
}

fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut p = base.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

fn header(raw_type: u32, size: u32, id: u64) -> [u8; HEADER_SIZE] {
    Header { raw_type, size, id }.encode()
}

/// A whole frame with a raw type and body (no checks: the point is to send anything).
fn raw_frame(raw_type: u32, id: u64, body: &[u8]) -> Vec<u8> {
    let mut v = header(raw_type, (HEADER_SIZE + body.len()) as u32, id).to_vec();
    v.extend_from_slice(body);
    v
}

fn response(rpc: Rpc, id: u64, body: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(body).expect("JSON");
    raw_frame(Identifier::Response(rpc).to_u32(), id, &body)
}

fn notification(container: &str, kind: &str, result: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"ContainerId":"{container}","ActivityId":"00000000-0000-0000-0000-000000000000","Type":"{kind}","Operation":"None","Result":{result}}}"#
    );
    raw_frame(
        Identifier::CONTAINER_NOTIFICATION.to_u32(),
        0,
        body.as_bytes(),
    )
}

impl Agent {
    fn event(&mut self, what: &str) {
        if let Some(s) = &mut self.events {
            let _ = writeln!(s, "{} {what}", self.name);
        }
    }

    async fn serve(&mut self) -> Result<(), String> {
        loop {
            let stream = self.dial_bridge().await?;
            match self.serve_connection(stream).await? {
                End::Shutdown => return Ok(()),
                // A liar behaves like the real agent here: it dials again (every 25 ms, for as
                // long as it lives), so a host that gives up on it must also end it.
                End::Closed if self.negotiation != "honest" => {
                    self.event("bridge-closed; dialling again");
                }
                End::Closed => return Ok(()),
            }
        }
    }

    async fn dial_bridge(&self) -> Result<UnixStream, String> {
        let path = port_path(&self.base, BRIDGE_PORT);
        loop {
            if let Ok(s) = UnixStream::connect(&path).await {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn serve_connection(&mut self, stream: UnixStream) -> Result<End, String> {
        let (r, w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        loop {
            let frame = match bridge::io::read_frame(&mut r, 16 << 20).await {
                Ok(f) => f,
                Err(_) => return Ok(End::Closed),
            };
            let Identifier::Request(rpc) = frame.ident else {
                continue;
            };
            let body: Value = serde_json::from_slice(&frame.body).unwrap_or(Value::Null);
            let container = body["ContainerId"].as_str().unwrap_or_default().to_string();
            let ok = json!({"Result": 0});
            let answer = match rpc {
                Rpc::NegotiateProtocol => self.negotiate(frame.id),
                Rpc::Create => match container.as_str() {
                    "oversize" | "undersize" | "halfframe" => {
                        self.broken_frame(&container, frame.id, &mut w).await?;
                        return silence(&mut r).await;
                    }
                    misbehaviour => {
                        self.misbehave(misbehaviour, &frame, &mut w).await?;
                        response(rpc, frame.id, &ok)
                    }
                },
                Rpc::ExecuteProcess => self.execute(&frame, &body).await?,
                Rpc::WaitForProcess => {
                    response(rpc, frame.id, &json!({"Result": 0, "ExitCode": 0}))
                }
                Rpc::ShutdownForced | Rpc::ShutdownGraceful => {
                    send(&mut w, &response(rpc, frame.id, &ok)).await?;
                    return Ok(End::Shutdown);
                }
                Rpc::GetProperties => response(
                    rpc,
                    frame.id,
                    &json!({"Result": 0, "Properties": "{\"ProcessList\":[]}"}),
                ),
                _ => response(rpc, frame.id, &ok),
            };
            send(&mut w, &answer).await?;
        }
    }

    fn negotiate(&mut self, id: u64) -> Vec<u8> {
        let mut answer = serde_json::to_value(bridge::negotiate::guest_answer(&Default::default()))
            .expect("JSON");
        match self.negotiation.as_str() {
            "version-5" => answer["Version"] = json!(5),
            "garbage" => answer["Capabilities"] = json!("nonsense"),
            _ => {}
        }
        self.event(&format!("negotiated {}", self.negotiation));
        response(Rpc::NegotiateProtocol, id, &answer)
    }

    /// Misbehaves as the container id says, before the Create is answered.
    async fn misbehave<W: AsyncWrite + Unpin>(
        &mut self,
        what: &str,
        create: &Frame,
        w: &mut W,
    ) -> Result<(), String> {
        match what {
            "flood" => {
                // Fat ones first: each near the frame limit, as much as a host keeping them
                // all would hold for ever.
                let fat = "X".repeat(60_000);
                for i in 0..FAT_NOTIFICATIONS {
                    w.write_all(&notification(what, &fat, i))
                        .await
                        .map_err(io)?;
                }
                for i in 0..KNOWN_NOTIFICATIONS {
                    w.write_all(&notification(what, "UnexpectedExit", i))
                        .await
                        .map_err(io)?;
                }
                for i in 0..UNKNOWN_NOTIFICATIONS {
                    w.write_all(&notification(&format!("ghost-{i}"), "UnexpectedExit", i))
                        .await
                        .map_err(io)?;
                }
                w.flush().await.map_err(io)?;
                self.event("flood-sent");
            }
            "strays" => {
                for i in 0..STRAY_RESPONSES {
                    let rpc = Rpc::ALL[i % Rpc::ALL.len()];
                    let id = (1 << 40) + i as u64;
                    let body = json!({"Result": 0, "ExitCode": 3, "ProcessId": 7, "Version": 4});
                    w.write_all(&response(rpc, id, &body)).await.map_err(io)?;
                }
                // Not JSON at all, for ids nobody asked.
                for i in 0..1000u64 {
                    let raw = Identifier::Response(Rpc::WaitForProcess).to_u32();
                    w.write_all(&raw_frame(raw, (1 << 41) + i, b"\xff not json {"))
                        .await
                        .map_err(io)?;
                }
                // The pending Create's id, with an ExecuteProcess answer: not its answer.
                let wrong = json!({"Result": 0, "ProcessId": 666});
                w.write_all(&response(Rpc::ExecuteProcess, create.id, &wrong))
                    .await
                    .map_err(io)?;
                // Requests, which hosts do not serve.
                for i in 0..GUEST_REQUESTS {
                    let rpc = Rpc::ALL[i % Rpc::ALL.len()];
                    let raw = Identifier::Request(rpc).to_u32();
                    w.write_all(&raw_frame(raw, i as u64, br#"{"ContainerId":"host"}"#))
                        .await
                        .map_err(io)?;
                }
                w.flush().await.map_err(io)?;
                self.event("strays-sent");
            }
            "ports" => {
                let (refused, connected) = self.dial_ports(&not_given_ports()).await;
                self.event(&format!("ports refused={refused} connected={connected}"));
            }
            "wrongports" => self.wrong_ports = true,
            "redial" => {
                let path = port_path(&self.base, BRIDGE_PORT);
                let mut held = Vec::new();
                let mut failed = 0;
                for _ in 0..BRIDGE_DIALS {
                    match UnixStream::connect(&path).await {
                        Ok(s) => held.push(s),
                        Err(_) => failed += 1,
                    }
                }
                // A few say something, as a new agent would.
                for s in held.iter_mut().take(100) {
                    let _ = s.write_all(&notification("redial", "Hello", 0)).await;
                }
                self.event(&format!("redial connected={} failed={failed}", held.len()));
            }
            _ => {}
        }
        Ok(())
    }

    /// Tries each port; returns how many were refused and how many connected (to which it
    /// writes junk).
    async fn dial_ports(&self, ports: &[u32]) -> (usize, usize) {
        let (mut refused, mut connected) = (0, 0);
        for &port in ports {
            match UnixStream::connect(port_path(&self.base, port)).await {
                Ok(mut s) => {
                    connected += 1;
                    let _ = s.write_all(b"junk from a port nobody gave out").await;
                }
                Err(_) => refused += 1,
            }
        }
        (refused, connected)
    }

    /// Writes a frame the host cannot read past, as the container id says.
    async fn broken_frame<W: AsyncWrite + Unpin>(
        &mut self,
        what: &str,
        create_id: u64,
        w: &mut W,
    ) -> Result<(), String> {
        let note = Identifier::CONTAINER_NOTIFICATION.to_u32();
        let bytes = match what {
            "oversize" => {
                let mut v = header(note, 1 << 30, 0).to_vec();
                v.extend_from_slice(br#"{"ContainerId":""#);
                v.extend(std::iter::repeat_n(b'A', 1000));
                v
            }
            "undersize" => {
                let mut v = header(note, 8, 0).to_vec();
                v.extend_from_slice(b"whatever");
                v
            }
            _ => {
                // The Create's answer: 200 bytes announced, 30 sent.
                let mut v =
                    header(Identifier::Response(Rpc::Create).to_u32(), 200, create_id).to_vec();
                v.extend_from_slice(br#"{"Result":0,"SelectedProtoco"#);
                v
            }
        };
        send(w, &bytes).await?;
        self.event(&format!("{what}-sent"));
        Ok(())
    }

    async fn execute(&mut self, frame: &Frame, body: &Value) -> Result<Vec<u8>, String> {
        let given = &body["Settings"]["VsockStdioRelaySettings"];
        let port = |k: &str| given[k].as_u64().unwrap_or(0) as u32;
        let (stdin, stdout, stderr) = (port("StdIn"), port("StdOut"), port("StdErr"));
        let pid = self.next_pid;
        self.next_pid += 1;
        if std::mem::take(&mut self.wrong_ports) {
            // Everything next to what was given, nothing that was.
            let others: Vec<u32> = [stdin, stdout, stderr]
                .into_iter()
                .filter(|&p| p != 0)
                .flat_map(|p| [p + 1000, p - 1, p + 1])
                .filter(|p| ![stdin, stdout, stderr, BRIDGE_PORT].contains(p))
                .collect();
            let (refused, connected) = self.dial_ports(&others).await;
            self.event(&format!(
                "wrongports refused={refused} connected={connected}"
            ));
        } else {
            // The given ports, as the real agent does: stdout says who answered.
            for p in [stdin, stderr] {
                if p != 0 {
                    let _ = UnixStream::connect(port_path(&self.base, p)).await;
                }
            }
            if stdout != 0
                && let Ok(mut s) = UnixStream::connect(port_path(&self.base, stdout)).await
            {
                let _ = s.write_all(b"hostile\n").await;
            }
        }
        Ok(response(
            Rpc::ExecuteProcess,
            frame.id,
            &json!({"Result": 0, "ProcessId": pid}),
        ))
    }
}

/// Ports no host hands out, or not on this connection yet: below the stdio range, the
/// range's first thousand, far up, the very top.
fn not_given_ports() -> Vec<u32> {
    let mut ports = vec![0, 1, 2, 1023, 1024, BRIDGE_PORT - 1, 0x7fff_ffff, u32::MAX];
    ports.extend(FIRST_STDIO_PORT + 1000..FIRST_STDIO_PORT + 2000);
    ports
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), String> {
    w.write_all(bytes).await.map_err(io)?;
    w.flush().await.map_err(io)
}

fn io(e: std::io::Error) -> String {
    format!("writing to the host: {e}")
}

/// Never writes again; reads (and ignores) what the host sends until it hangs up.
async fn silence<R: AsyncRead + Unpin>(r: &mut R) -> Result<End, String> {
    let _ = tokio::io::copy(r, &mut tokio::io::sink()).await;
    Ok(End::Closed)
}
