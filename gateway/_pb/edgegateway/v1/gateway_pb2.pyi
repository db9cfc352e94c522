from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DevicePayload(_message.Message):
    __slots__ = ("device_id", "payload", "topic", "profile")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    payload: bytes
    topic: str
    profile: str
    def __init__(self, device_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., topic: _Optional[str] = ..., profile: _Optional[str] = ...) -> None: ...

class SubmitTransactionsRequest(_message.Message):
    __slots__ = ("payloads",)
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    payloads: _containers.RepeatedCompositeFieldContainer[DevicePayload]
    def __init__(self, payloads: _Optional[_Iterable[_Union[DevicePayload, _Mapping]]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("outcome", "tx_id", "reason", "detail")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[SubmitResult.Outcome]
        STORED: _ClassVar[SubmitResult.Outcome]
        DUPLICATE: _ClassVar[SubmitResult.Outcome]
        REJECTED: _ClassVar[SubmitResult.Outcome]
    OUTCOME_UNSPECIFIED: SubmitResult.Outcome
    STORED: SubmitResult.Outcome
    DUPLICATE: SubmitResult.Outcome
    REJECTED: SubmitResult.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TX_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    outcome: SubmitResult.Outcome
    tx_id: str
    reason: str
    detail: str
    def __init__(self, outcome: _Optional[_Union[SubmitResult.Outcome, str]] = ..., tx_id: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class SubmitTransactionsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResult, _Mapping]]] = ...) -> None: ...

class GetTransactionRequest(_message.Message):
    __slots__ = ("tx_id",)
    TX_ID_FIELD_NUMBER: _ClassVar[int]
    tx_id: str
    def __init__(self, tx_id: _Optional[str] = ...) -> None: ...

class GetTransactionResponse(_message.Message):
    __slots__ = ("state", "tx_id", "transaction", "batch_seq", "log_index", "tlog_proof")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[GetTransactionResponse.State]
        PENDING: _ClassVar[GetTransactionResponse.State]
        BATCHED: _ClassVar[GetTransactionResponse.State]
        COMMITTED: _ClassVar[GetTransactionResponse.State]
    STATE_UNSPECIFIED: GetTransactionResponse.State
    PENDING: GetTransactionResponse.State
    BATCHED: GetTransactionResponse.State
    COMMITTED: GetTransactionResponse.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    TX_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    TLOG_PROOF_FIELD_NUMBER: _ClassVar[int]
    state: GetTransactionResponse.State
    tx_id: str
    transaction: bytes
    batch_seq: int
    log_index: int
    tlog_proof: bytes
    def __init__(self, state: _Optional[_Union[GetTransactionResponse.State, str]] = ..., tx_id: _Optional[str] = ..., transaction: _Optional[bytes] = ..., batch_seq: _Optional[int] = ..., log_index: _Optional[int] = ..., tlog_proof: _Optional[bytes] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("seq", "include_transactions")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    include_transactions: bool
    def __init__(self, seq: _Optional[int] = ..., include_transactions: _Optional[bool] = ...) -> None: ...

class GetBatchResponse(_message.Message):
    __slots__ = ("seq", "checkpoint", "first_index", "tx_count", "committed", "transactions")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    TX_COUNT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    checkpoint: bytes
    first_index: int
    tx_count: int
    committed: bool
    transactions: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, seq: _Optional[int] = ..., checkpoint: _Optional[bytes] = ..., first_index: _Optional[int] = ..., tx_count: _Optional[int] = ..., committed: _Optional[bool] = ..., transactions: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LedgerNodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "state", "last_error", "log_size")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: str
    last_error: str
    log_size: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ..., log_size: _Optional[int] = ...) -> None: ...

class GatewayStatus(_message.Message):
    __slots__ = ("gateway_id", "version", "spool_depth", "oldest_pending_age_s", "last_signed_seq", "last_committed_seq", "hsm_state", "key_id", "mqtt_connected", "ledger_nodes", "cpu_percent", "memory_percent", "spool_disk_free_bytes", "intake_paused", "intake_paused_reason", "transactions_stored", "transactions_rejected", "uptime_s", "quorum")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_SIGNED_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    HSM_STATE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MQTT_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LEDGER_NODES_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INTAKE_PAUSED_FIELD_NUMBER: _ClassVar[int]
    INTAKE_PAUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_STORED_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    version: str
    spool_depth: int
    oldest_pending_age_s: float
    last_signed_seq: int
    last_committed_seq: int
    hsm_state: str
    key_id: str
    mqtt_connected: bool
    ledger_nodes: _containers.RepeatedCompositeFieldContainer[LedgerNodeStatus]
    cpu_percent: float
    memory_percent: float
    spool_disk_free_bytes: float
    intake_paused: bool
    intake_paused_reason: str
    transactions_stored: int
    transactions_rejected: int
    uptime_s: int
    quorum: int
    def __init__(self, gateway_id: _Optional[str] = ..., version: _Optional[str] = ..., spool_depth: _Optional[int] = ..., oldest_pending_age_s: _Optional[float] = ..., last_signed_seq: _Optional[int] = ..., last_committed_seq: _Optional[int] = ..., hsm_state: _Optional[str] = ..., key_id: _Optional[str] = ..., mqtt_connected: _Optional[bool] = ..., ledger_nodes: _Optional[_Iterable[_Union[LedgerNodeStatus, _Mapping]]] = ..., cpu_percent: _Optional[float] = ..., memory_percent: _Optional[float] = ..., spool_disk_free_bytes: _Optional[float] = ..., intake_paused: _Optional[bool] = ..., intake_paused_reason: _Optional[str] = ..., transactions_stored: _Optional[int] = ..., transactions_rejected: _Optional[int] = ..., uptime_s: _Optional[int] = ..., quorum: _Optional[int] = ...) -> None: ...
