from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostProcess(_message.Message):
    __slots__ = ("role", "pid")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    role: str
    pid: int
    def __init__(self, role: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class Container(_message.Message):
    __slots__ = ("id", "status", "labels", "cpu_usec", "memory_bytes", "memory_limit_bytes", "pids")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CPU_USEC_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: str
    labels: _containers.ScalarMap[str, str]
    cpu_usec: int
    memory_bytes: int
    memory_limit_bytes: int
    pids: int
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., cpu_usec: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., pids: _Optional[int] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "sum")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ...) -> None: ...

class SandboxInfo(_message.Message):
    __slots__ = ("sandbox_id", "namespace", "boot", "boot_seconds", "processes", "containers", "guest_mem_total_bytes", "guest_mem_available_bytes", "guest_load1", "guest_rx_bytes", "guest_tx_bytes", "guest_containers", "agent_rpc_seconds", "vm_memory_bytes", "console_socket", "firmware", "attestation")
    class AgentRpcSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Histogram
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BOOT_FIELD_NUMBER: _ClassVar[int]
    BOOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_LOAD1_FIELD_NUMBER: _ClassVar[int]
    GUEST_RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    GUEST_CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    AGENT_RPC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VM_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_SOCKET_FIELD_NUMBER: _ClassVar[int]
    FIRMWARE_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    namespace: str
    boot: str
    boot_seconds: float
    processes: _containers.RepeatedCompositeFieldContainer[HostProcess]
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    guest_mem_total_bytes: int
    guest_mem_available_bytes: int
    guest_load1: float
    guest_rx_bytes: int
    guest_tx_bytes: int
    guest_containers: int
    agent_rpc_seconds: _containers.MessageMap[str, Histogram]
    vm_memory_bytes: int
    console_socket: str
    firmware: str
    attestation: Attestation
    def __init__(self, sandbox_id: _Optional[str] = ..., namespace: _Optional[str] = ..., boot: _Optional[str] = ..., boot_seconds: _Optional[float] = ..., processes: _Optional[_Iterable[_Union[HostProcess, _Mapping]]] = ..., containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ..., guest_mem_total_bytes: _Optional[int] = ..., guest_mem_available_bytes: _Optional[int] = ..., guest_load1: _Optional[float] = ..., guest_rx_bytes: _Optional[int] = ..., guest_tx_bytes: _Optional[int] = ..., guest_containers: _Optional[int] = ..., agent_rpc_seconds: _Optional[_Mapping[str, Histogram]] = ..., vm_memory_bytes: _Optional[int] = ..., console_socket: _Optional[str] = ..., firmware: _Optional[str] = ..., attestation: _Optional[_Union[Attestation, _Mapping]] = ...) -> None: ...

class Attestation(_message.Message):
    __slots__ = ("passed", "pcrs", "detail")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    pcrs: _containers.RepeatedCompositeFieldContainer[PcrCheck]
    detail: str
    def __init__(self, passed: _Optional[bool] = ..., pcrs: _Optional[_Iterable[_Union[PcrCheck, _Mapping]]] = ..., detail: _Optional[str] = ...) -> None: ...

class PcrCheck(_message.Message):
    __slots__ = ("index", "expected", "measured", "what")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    index: int
    expected: str
    measured: str
    what: str
    def __init__(self, index: _Optional[int] = ..., expected: _Optional[str] = ..., measured: _Optional[str] = ..., what: _Optional[str] = ...) -> None: ...
