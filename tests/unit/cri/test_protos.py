"""The CRI schema: wire-identical to upstream, generated code fresh, codecs agree.

Three checks:
- ``protos/runtime/v1/api.proto`` compiles to the same descriptor as the
  reference schema (messages, fields, numbers, enums, services), comments aside;
- the committed betterproto code is what ``nox -s protos`` generates now;
- every message survives a round trip between betterproto and protobuf
  classes we did not write: the third-party CRI client's, and protobuf's own
  dynamic classes built from the reference schema.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as client_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.unknown_fields import UnknownFieldSet

from pouch.cri._pb.runtime import v1 as ours

REPO = Path(__file__).parents[3]
PROTO_DIR = REPO / "protos"
GENERATED = REPO / "pouch" / "cri" / "_pb"
REFERENCE = REPO.parent / "shared" / "reference" / "cri-api-v1.proto"

pytestmark = pytest.mark.timeout(120)


def _protoc(*args: str | Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *map(str, args)],
        check=True,
        env=env,
        capture_output=True,
        timeout=60,
    )


def _descriptor_set(proto_root: Path, tmp: Path, name: str) -> descriptor_pb2.FileDescriptorSet:
    out = tmp / f"{name}.pb"
    _protoc(f"-I{proto_root}", f"--descriptor_set_out={out}", "runtime/v1/api.proto")
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


@pytest.fixture(scope="module")
def reference_fds(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    assert REFERENCE.exists(), f"reference schema missing at {REFERENCE}"
    tmp = tmp_path_factory.mktemp("ref")
    (tmp / "runtime" / "v1").mkdir(parents=True)
    shutil.copy(REFERENCE, tmp / "runtime" / "v1" / "api.proto")
    return _descriptor_set(tmp, tmp, "reference")


@pytest.fixture(scope="module")
def reference_pool(
    reference_fds: descriptor_pb2.FileDescriptorSet,
) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file_proto in reference_fds.file:
        pool.Add(file_proto)
    return pool


def test_schema_is_wire_identical_to_reference(tmp_path, reference_fds):
    ours_fds = _descriptor_set(PROTO_DIR, tmp_path, "ours")
    (mine,) = ours_fds.file
    (theirs,) = reference_fds.file
    assert mine.package == theirs.package == "runtime.v1"
    assert [m.name for m in mine.message_type] == [m.name for m in theirs.message_type]
    assert [e.name for e in mine.enum_type] == [e.name for e in theirs.enum_type]
    assert [s.name for s in mine.service] == [s.name for s in theirs.service]
    # Field by field, then the whole thing (source info holds only comments/positions).
    for m_ours, m_ref in zip(mine.message_type, theirs.message_type, strict=True):
        assert m_ours == m_ref, m_ours.name
    mine.ClearField("source_code_info")
    theirs.ClearField("source_code_info")
    assert mine == theirs
    assert sum(len(s.method) for s in mine.service) == 41


def test_generated_code_is_fresh(tmp_path):
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    _protoc(f"-I{PROTO_DIR}", f"--python_betterproto_out={tmp_path}", *sources)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    committed = sorted(p.relative_to(GENERATED) for p in GENERATED.rglob("*.py"))
    assert fresh == committed
    for rel in fresh:
        assert filecmp.cmp(tmp_path / rel, GENERATED / rel, shallow=False), (
            f"{rel} differs from a fresh generation: run `nox -s protos`"
        )


# ---- round trips ---------------------------------------------------------------

_FD = descriptor.FieldDescriptor


def _scalar(field: descriptor.FieldDescriptor, salt: int) -> object:
    t = field.type
    if t in (_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32):
        return -7 - salt
    if t in (_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64):
        return -(2**40) - salt
    if t in (_FD.TYPE_UINT32, _FD.TYPE_FIXED32):
        return 2**31 + salt
    if t in (_FD.TYPE_UINT64, _FD.TYPE_FIXED64):
        return 2**63 + salt
    if t == _FD.TYPE_BOOL:
        return True
    if t == _FD.TYPE_STRING:
        return f"{field.name}-{salt}-é"
    if t == _FD.TYPE_BYTES:
        return bytes([0, 255, salt % 256])
    if t in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        return 1.5 + salt
    if t == _FD.TYPE_ENUM:
        values = field.enum_type.values
        nonzero = [v.number for v in values if v.number != 0] or [0]
        return nonzero[salt % len(nonzero)]
    raise AssertionError(f"unhandled field type {t}")


def _fill(msg, depth: int = 0) -> None:
    """Set every field of a protobuf message to a non-default value."""
    for field in msg.DESCRIPTOR.fields:
        if (
            field.containing_oneof is not None
            and field.index != field.containing_oneof.fields[0].index
        ):
            continue  # one member per oneof
        is_repeated = field.label == _FD.LABEL_REPEATED
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = field.message_type.fields
            target = getattr(msg, field.name)
            for salt in (1, 2):
                key = _scalar(key_f, salt)
                if value_f.message_type is not None:
                    if depth < 4:
                        _fill(target[key], depth + 1)
                    else:
                        target[key].SetInParent()
                else:
                    target[key] = _scalar(value_f, salt)
        elif field.message_type is not None:
            if depth >= 4:
                continue
            if is_repeated:
                for _ in range(2):
                    _fill(getattr(msg, field.name).add(), depth + 1)
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                _fill(sub, depth + 1)
        elif is_repeated:
            getattr(msg, field.name).extend([_scalar(field, 3), _scalar(field, 4)])
        else:
            setattr(msg, field.name, _scalar(field, 5))


def _message_names() -> list[str]:
    text = (PROTO_DIR / "runtime" / "v1" / "api.proto").read_text()
    import re

    return re.findall(r"^message (\w+)\s*\{", text, re.M)


# betterproto renames acronyms (DNSConfig -> DnsConfig); match case-insensitively.
_OURS = {n.lower(): getattr(ours, n) for n in dir(ours) if isinstance(getattr(ours, n), type)}


def _betterproto_class(name: str) -> type:
    return _OURS[name.lower()]


def _roundtrip(pb_cls, name: str) -> None:
    original = pb_cls()
    _fill(original)
    wire = original.SerializeToString()
    assert wire or not original.DESCRIPTOR.fields, name
    bp_cls = _betterproto_class(name)
    parsed = bp_cls().parse(wire)
    back = pb_cls.FromString(bytes(parsed))
    assert len(UnknownFieldSet(back)) == 0, name
    assert back == original, name


def test_every_message_is_covered():
    names = _message_names()
    assert len(names) == 170
    for name in names:
        assert name.lower() in _OURS, name


@pytest.mark.parametrize("name", _message_names())
def test_roundtrip_with_reference_schema(name, reference_pool):
    cls = message_factory.GetMessageClass(
        reference_pool.FindMessageTypeByName(f"runtime.v1.{name}")
    )
    _roundtrip(cls, name)


@pytest.mark.parametrize("name", sorted(client_pb2.DESCRIPTOR.message_types_by_name))
def test_roundtrip_with_third_party_client(name):
    _roundtrip(getattr(client_pb2, name), name)
