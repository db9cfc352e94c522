from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class BatchHeader(_message.Message):
    __slots__ = ("version", "gateway_id", "seq", "prev_header_hash", "merkle_root", "tx_count", "byte_count", "first_received_ms", "last_received_ms", "created_ms", "key_id", "signature_algorithm")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_HEADER_HASH_FIELD_NUMBER: _ClassVar[int]
    MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    TX_COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_RECEIVED_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVED_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    version: int
    gateway_id: str
    seq: int
    prev_header_hash: bytes
    merkle_root: bytes
    tx_count: int
    byte_count: int
    first_received_ms: int
    last_received_ms: int
    created_ms: int
    key_id: bytes
    signature_algorithm: str
    def __init__(self, version: _Optional[int] = ..., gateway_id: _Optional[str] = ..., seq: _Optional[int] = ..., prev_header_hash: _Optional[bytes] = ..., merkle_root: _Optional[bytes] = ..., tx_count: _Optional[int] = ..., byte_count: _Optional[int] = ..., first_received_ms: _Optional[int] = ..., last_received_ms: _Optional[int] = ..., created_ms: _Optional[int] = ..., key_id: _Optional[bytes] = ..., signature_algorithm: _Optional[str] = ...) -> None: ...

class SignedBatch(_message.Message):
    __slots__ = ("header", "signature", "transactions")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    signature: bytes
    transactions: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, header: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., transactions: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("node_id", "gateway_id", "seq", "header_hash", "committed_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEADER_HASH_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    gateway_id: str
    seq: int
    header_hash: bytes
    committed_ms: int
    def __init__(self, node_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., seq: _Optional[int] = ..., header_hash: _Optional[bytes] = ..., committed_ms: _Optional[int] = ...) -> None: ...
