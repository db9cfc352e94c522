from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Transaction(_message.Message):
    __slots__ = ("device_id", "device_seq", "device_time_ms", "received_time_ms", "profile", "kind", "fields", "payload_sha256", "gateway_id", "channel")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SEQ_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_seq: int
    device_time_ms: int
    received_time_ms: int
    profile: str
    kind: str
    fields: bytes
    payload_sha256: bytes
    gateway_id: str
    channel: str
    def __init__(self, device_id: _Optional[str] = ..., device_seq: _Optional[int] = ..., device_time_ms: _Optional[int] = ..., received_time_ms: _Optional[int] = ..., profile: _Optional[str] = ..., kind: _Optional[str] = ..., fields: _Optional[bytes] = ..., payload_sha256: _Optional[bytes] = ..., gateway_id: _Optional[str] = ..., channel: _Optional[str] = ...) -> None: ...
