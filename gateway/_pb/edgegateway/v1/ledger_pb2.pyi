from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetConsistencyRequest(_message.Message):
    __slots__ = ("gateway_id", "old_size")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    old_size: int
    def __init__(self, gateway_id: _Optional[str] = ..., old_size: _Optional[int] = ...) -> None: ...

class ConsistencyProof(_message.Message):
    __slots__ = ("checkpoint", "old_size", "proof")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    checkpoint: bytes
    old_size: int
    proof: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, checkpoint: _Optional[bytes] = ..., old_size: _Optional[int] = ..., proof: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AddCheckpointRequest(_message.Message):
    __slots__ = ("gateway_id", "old_size", "consistency_proof", "checkpoint", "leaves")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_PROOF_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    old_size: int
    consistency_proof: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint: bytes
    leaves: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, gateway_id: _Optional[str] = ..., old_size: _Optional[int] = ..., consistency_proof: _Optional[_Iterable[bytes]] = ..., checkpoint: _Optional[bytes] = ..., leaves: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Cosignature(_message.Message):
    __slots__ = ("node_id", "size", "line")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    size: int
    line: str
    def __init__(self, node_id: _Optional[str] = ..., size: _Optional[int] = ..., line: _Optional[str] = ...) -> None: ...

class GetHeadRequest(_message.Message):
    __slots__ = ("gateway_id",)
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    def __init__(self, gateway_id: _Optional[str] = ...) -> None: ...

class Head(_message.Message):
    __slots__ = ("gateway_id", "node_id", "log_size")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    node_id: str
    log_size: int
    def __init__(self, gateway_id: _Optional[str] = ..., node_id: _Optional[str] = ..., log_size: _Optional[int] = ...) -> None: ...
