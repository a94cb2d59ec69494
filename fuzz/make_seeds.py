#!/usr/bin/env python3
"""Writes the hand-made seed corpus: fuzz/corpus/<target>/seed-*.

frame_decoder seeds are whole frames (16-byte little-endian header: type u32, size u32 of the
whole frame, id u64; then the JSON body); payloads seeds are bare JSON bodies.
snapshot_decoder seeds are snapshot files (a "FERRY-SNAPSHOT 1 <len> <crc32>" line, then the
JSON body) and bare bodies (the target also tries its input behind a header that fits).
mux seeds are what a guest sends on its virtio-serial port: the session hello, then yamux
frames (12-byte big-endian header: version 0, type, flags, stream id, length). migration_options
seeds are protobuf-encoded InitializeOptions. Run it again after changing it; libFuzzer's own
discoveries stay out of git (see fuzz/.gitignore).
"""

import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
UVM = "00000000-0000-0000-0000-000000000000"


def ident(kind, number):
    # kind 1 request, 2 response, 3 notification; category 0x001; version 1.
    return (kind << 28) | (0x001 << 20) | (number << 8) | 1


def frame(raw_type, ident_id, body, size=None):
    body = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    size = 16 + len(body) if size is None else size
    return struct.pack("<IIQ", raw_type, size, ident_id) + body


def in_string(value):
    # Fields such as ProcessParameters and Query carry JSON inside a JSON string.
    return json.dumps(value, separators=(",", ":"))


BODIES = {
    "negotiate-req": (1, 0xB, {"ContainerId": UVM, "ActivityId": UVM, "MinimumVersion": 4, "MaximumVersion": 4}),
    "get-properties-req": (1, 0x9, {"ContainerId": UVM, "ActivityId": UVM,
                                    "Query": in_string({"PropertyTypes": ["ProcessList"]})}),
    "execute-process-req": (1, 0x5, {"ContainerId": UVM, "ActivityId": UVM, "Settings": {
        "ProcessParameters": in_string({"CommandArgs": ["/bin/sh", "-c", "echo hi"], "Environment": {"PATH": "/bin"},
                                        "CreateStdOutPipe": True, "ConsoleSize": [24, 80]}),
        "VsockStdioRelaySettings": {"StdOut": 1073741825}}}),
    "create-req": (1, 0x1, {"ContainerId": "web-1", "ActivityId": UVM, "ContainerConfig": in_string({
        "SchemaVersion": {"Major": 2, "Minor": 1}, "OciBundlePath": "/run/c/web-1",
        "OciSpecification": {"ociVersion": "1.1.0", "process": {"args": ["sh"], "cwd": "/"}, "root": {"path": "rootfs"}},
        "ScratchDirPath": "/run/scratch"})}),
    "wait-req": (1, 0x6, {"ContainerId": UVM, "ProcessId": 42, "TimeoutInMs": 4294967295}),
    "signal-req": (1, 0x7, {"ContainerId": "web-1", "ProcessId": 42, "Options": {"Signal": 15}}),
    "modify-req": (1, 0xA, {"ContainerId": UVM, "Request": {"ResourceType": "MappedVirtualDisk",
                                                            "RequestType": "Add", "Settings": {"Lun": 1}}}),
    "lifecycle-req": (1, 0xF, {"ContainerId": UVM, "ocsc": {"trace": [1, 2]}, "Extra": None}),
    "negotiate-resp": (2, 0xB, {"Result": 0, "Version": 4, "Capabilities": {
        "SendHostCreateMessage": True, "SupportedSchemaVersions": [{"Major": 2, "Minor": 1}],
        "RuntimeOsType": "Linux", "GuestDefinedCapabilities": {"SignalProcessSupported": True}}}),
    "get-properties-resp": (2, 0x9, {"Result": 0, "ActivityId": UVM,
                                     "Properties": in_string({"ProcessList": [{"ProcessId": 7, "ImageName": "sh"}]})}),
    "error-resp": (2, 0x6, {"Result": -2147024809, "ErrorMessage": "no such process",
                            "ErrorRecords": [{"Result": -2147024809, "Message": "no such process",
                                              "ModuleName": "ferry-gcs", "FileName": "", "Line": 0}]}),
    "notification": (3, 0x1, {"ContainerId": "web-1", "Type": "UnexpectedExit", "Operation": "None",
                              "Result": 137, "ResultInfo": in_string({"why": "killed"})}),
}


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def main():
    for i, (name, (kind, number, body)) in enumerate(BODIES.items(), start=1):
        write("frame_decoder", name, frame(ident(kind, number), 0 if kind == 3 else i, body))
        write("payloads", name + ".json", json.dumps(body).encode())

    neg = BODIES["negotiate-req"][2]
    req = ident(1, 0xB)
    # Several frames back to back, as the stream decoder sees them.
    write("frame_decoder", "two-frames", frame(req, 1, neg) + frame(ident(1, 0x9), 2, BODIES["get-properties-req"][2]))
    write("frame_decoder", "truncated", frame(req, 3, neg)[:30])
    write("frame_decoder", "size-below-header", frame(req, 4, b"", size=8))
    write("frame_decoder", "size-too-large", frame(req, 5, b"{}", size=0x0100_0000) + frame(req, 6, neg))
    write("frame_decoder", "unknown-type", frame(0x1010_9901, 7, b"{}") + frame(req, 8, neg))
    write("frame_decoder", "bad-utf8", frame(req, 9, b"\xff{}"))
    write("frame_decoder", "empty-body", frame(ident(2, 0x2), 10, b""))
    write("payloads", "empty-object.json", b"{}")
    write("payloads", "hcsshim-newline.json", json.dumps(neg).encode() + b"\n")

    snapshot_seeds()
    mux_seeds()
    migration_options_seeds()


# --- snapshot_decoder -------------------------------------------------------------------------

def process(pid, **extra):
    p = {"pid": pid, "args": ["sh", "-c", "sleep 1000"], "tty": False, "init": True,
         "migration": {"stdin_port": 0, "stdout_port": 0x40000001, "stderr_port": 0x40000002,
                       "wait_call_id": 17},
         "stdout_offset": 100, "stderr_offset": 0, "exit_code": None}
    p.update(extra)
    return p


SNAPSHOTS = {
    "local": {
        "uvm": {"name": "u", "backend": "local", "state_dir": "/run/ferry/uvms/u", "agent_pid": 42,
                "log_limit": 1 << 20},
        "connection": {"next_id": 1234, "next_port": 0x40000010},
        "containers": [{"id": "web", "rootfs": "/r", "created": 1, "processes": [
            process(7, stdin={"acked": 7, "pending": b"not yet seen".hex(), "closed": True})]}],
        "saved_at": 2, "saved_by_pid": 3,
    },
    "qemu": {
        "uvm": {"name": "q", "backend": "qemu", "state_dir": "/run/ferry/uvms/q", "agent_pid": 4242,
                "qemu": {"kernel": "/k/vmlinuz", "initrd": "/k/initrd", "memory_mib": 512, "cpus": 2,
                         "accel": "kvm", "port_name": "ferry.0", "qemu": "/usr/bin/qemu-system-x86_64"},
                "log_limit": 4096},
        "connection": {"next_id": 18446744073709551615, "next_port": 4294967295},
        "containers": [
            {"id": "a", "rootfs": "/ra", "created": 1700000000, "processes": [
                process(1, stdout_offset=None, stderr_offset=None, exit_code=137),
                process(2, init=False, tty=True, args=[], stdin={"acked": 0})]},
            {"id": "b", "rootfs": "/rb", "created": 0, "processes": []},
        ],
        "saved_at": 1700000001, "saved_by_pid": 99,
    },
    # Fields of older snapshots left out (log_limit, stdin), and one this ferry does not know.
    "old": {
        "uvm": {"name": "o", "backend": "local", "state_dir": "/s", "agent_pid": 1, "qemu": None},
        "connection": {"next_id": 0, "next_port": 0},
        "containers": [], "saved_at": 0, "saved_by_pid": 0, "unknown_field": [1, {"x": None}],
    },
}


def snapshot_file(body, version=1, length=None, crc=None):
    length = len(body) if length is None else length
    crc = zlib.crc32(body) if crc is None else crc
    return b"FERRY-SNAPSHOT %d %d %08x\n" % (version, length, crc) + body


def snapshot_seeds():
    for name, snap in SNAPSHOTS.items():
        body = json.dumps(snap, indent=2).encode()
        write("snapshot_decoder", name, snapshot_file(body))
        write("snapshot_decoder", name + ".json", body)
    good = snapshot_file(json.dumps(SNAPSHOTS["local"], indent=2).encode())
    body = good[good.index(b"\n") + 1:]
    write("snapshot_decoder", "truncated", good[:-10])
    write("snapshot_decoder", "newer-version", snapshot_file(body, version=2))
    write("snapshot_decoder", "bad-crc", snapshot_file(body, crc=zlib.crc32(body) ^ 1))
    write("snapshot_decoder", "huge-length", snapshot_file(body, length=(1 << 64) - 1))
    write("snapshot_decoder", "not-json", snapshot_file(b"{\"uvm\": [}"))


# --- mux --------------------------------------------------------------------------------------

HELLO = b"\0FERRY-MUX-SESSION-1\n"
DATA, WINDOW, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8
BRIDGE_PORT, STDIO_PORT, DIAL_PORT = 0x40000000, 0x40000001, 0x40000002


def yamux(kind, flags, stream, length_or_body=b""):
    if isinstance(length_or_body, int):
        return struct.pack(">BBHII", 0, kind, flags, stream, length_or_body)
    return struct.pack(">BBHII", 0, kind, flags, stream, len(length_or_body)) + length_or_body


def open_stream(stream, port, first=b""):
    # The guest (yamux server) opens even-numbered streams and names the port first.
    return yamux(DATA, SYN, stream, struct.pack("<I", port) + first)


def mux_seeds():
    neg = BODIES["negotiate-req"][2]
    bridge_frame = frame(ident(1, 0xB), 1, neg)
    write("mux", "hello-only", HELLO)
    write("mux", "stale-bytes-then-hello", b"old session\0FERRY-MUX half" + HELLO + yamux(PING, SYN, 0, 7))
    write("mux", "bridge-stream", HELLO + open_stream(2, BRIDGE_PORT, bridge_frame[:20])
          + yamux(DATA, 0, 2, bridge_frame[20:]) + yamux(DATA, FIN, 2))
    write("mux", "two-streams", HELLO + open_stream(2, BRIDGE_PORT) + open_stream(4, STDIO_PORT, b"out")
          + yamux(WINDOW, 0, 2, 1 << 20) + yamux(DATA, 0, 4, b"more output\n") + yamux(PING, SYN, 0, 1)
          + yamux(DATA, FIN, 4) + yamux(DATA, RST, 2))
    write("mux", "no-listener", HELLO + open_stream(2, 0x1234) + yamux(WINDOW, ACK, 2, 0))
    write("mux", "port-in-pieces", HELLO + yamux(WINDOW, SYN, 6, 0) + yamux(DATA, 0, 6, b"\x01\x00")
          + yamux(DATA, 0, 6, b"\x00\x40") + yamux(DATA, FIN, 6, b"x"))
    # The host dials (stream 1): the guest acknowledges and accepts, then talks and closes.
    write("mux", "answer-dial", HELLO + yamux(WINDOW, ACK, 1, 0) + yamux(DATA, 0, 1, b"\x00hello")
          + yamux(DATA, FIN, 1))
    write("mux", "refuse-dial", HELLO + yamux(WINDOW, ACK, 1, 0) + yamux(DATA, FIN, 1, b"\x01"))
    write("mux", "go-away", HELLO + open_stream(2, BRIDGE_PORT) + yamux(GO_AWAY, 0, 0, 0))
    write("mux", "big-frame-cut-short", HELLO + yamux(DATA, SYN, 2, 1 << 20)[:12] + b"\0\0\0\x40")
    write("mux", "bad-version", HELLO + b"\x01" + yamux(PING, SYN, 0, 1)[1:])


# --- migration_options ------------------------------------------------------------------------

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(number, value):
    if isinstance(value, bool) or isinstance(value, int):
        return varint(number << 3) + varint(int(value))
    if isinstance(value, float):
        return varint(number << 3 | 1) + struct.pack("<d", value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def message(*fields):
    return b"".join(field(n, v) for n, v in fields)


def throttle(**kw):
    numbers = {"skip_throttling": 1, "throttling_scale": 2, "minimum_throttle_percentage": 3,
               "target_number_of_brownout_transfer_passes": 4,
               "starting_brownout_pass_number_for_throttling": 5,
               "maximum_number_of_brownout_transfer_passes": 6, "target_blackout_transfer_time": 7,
               "blackout_time_threshold_for_cancelling_migration": 8}
    return 2, message(*((numbers[k], v) for k, v in kw.items()))


def migration_options_seeds():
    seeds = {
        "default": b"",
        "all-good": message((1, 1), throttle(skip_throttling=False, throttling_scale=100.0,
                                             minimum_throttle_percentage=20,
                                             maximum_number_of_brownout_transfer_passes=30,
                                             target_blackout_transfer_time=50,
                                             blackout_time_threshold_for_cancelling_migration=500),
                            (3, message((1, 4))), (5, True), (6, True), (7, True), (100, 10 << 30)),
        "unix-compressed": message((1, 2), (3, b""), (100, 1 << 20)),
        "skip-throttling": message(throttle(skip_throttling=True, throttling_scale=50.4)),
        "cancel-threshold": message(throttle(target_blackout_transfer_time=300,
                                             blackout_time_threshold_for_cancelling_migration=2000000),
                                    (6, True)),
        "threshold-below-target": message(throttle(target_blackout_transfer_time=300,
                                                   blackout_time_threshold_for_cancelling_migration=100)),
        "scale-nan": message(throttle(throttling_scale=float("nan"))),
        "unknown-transport": message((1, 7)),
        "checksum": message((4, True)),
        "pass-target": message(throttle(target_number_of_brownout_transfer_passes=5)),
        "unknown-field": message((1, 1), (50, b"hcsshim says"), (101, 3)),
    }
    for name, data in seeds.items():
        write("migration_options", name, data)


if __name__ == "__main__":
    main()
