#!/usr/bin/env python3
"""Writes the hand-made seed corpus: fuzz/corpus/<target>/seed-*.

frame_decoder seeds are whole frames (16-byte little-endian header: type u32, size u32 of the
whole frame, id u64; then the JSON body); payloads seeds are bare JSON bodies. Run it again
after changing it; libFuzzer's own discoveries stay out of git (see fuzz/.gitignore).
"""

import json
import os
import struct

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


if __name__ == "__main__":
    main()
