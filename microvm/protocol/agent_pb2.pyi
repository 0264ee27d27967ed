from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Measurements(_message.Message):
    __slots__ = ("pcr_sha256", "event_log", "error")
    class PcrSha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    PCR_SHA256_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    pcr_sha256: _containers.ScalarMap[int, bytes]
    event_log: bytes
    error: str
    def __init__(self, pcr_sha256: _Optional[_Mapping[int, bytes]] = ..., event_log: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class PortRequest(_message.Message):
    __slots__ = ("id", "port")
    ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    id: str
    port: int
    def __init__(self, id: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class NetworkInterface(_message.Message):
    __slots__ = ("mac", "mtu", "addresses", "name")
    MAC_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    mac: str
    mtu: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    name: str
    def __init__(self, mac: _Optional[str] = ..., mtu: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., name: _Optional[str] = ...) -> None: ...

class NetworkRoute(_message.Message):
    __slots__ = ("dest", "gateway", "device_mac", "source", "scope", "ipv6", "metric")
    DEST_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MAC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    IPV6_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    dest: str
    gateway: str
    device_mac: str
    source: str
    scope: int
    ipv6: bool
    metric: int
    def __init__(self, dest: _Optional[str] = ..., gateway: _Optional[str] = ..., device_mac: _Optional[str] = ..., source: _Optional[str] = ..., scope: _Optional[int] = ..., ipv6: _Optional[bool] = ..., metric: _Optional[int] = ...) -> None: ...

class NetworkConfig(_message.Message):
    __slots__ = ("interfaces", "routes", "ip_command")
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    IP_COMMAND_FIELD_NUMBER: _ClassVar[int]
    interfaces: _containers.RepeatedCompositeFieldContainer[NetworkInterface]
    routes: _containers.RepeatedCompositeFieldContainer[NetworkRoute]
    ip_command: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, interfaces: _Optional[_Iterable[_Union[NetworkInterface, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[NetworkRoute, _Mapping]]] = ..., ip_command: _Optional[_Iterable[str]] = ...) -> None: ...

class OOMEvent(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class CgroupStats(_message.Message):
    __slots__ = ("cpu_stat", "memory_stat", "memory_events", "memory_current", "memory_max", "swap_current", "swap_max", "pids_current", "pids_max")
    class CpuStatEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MemoryStatEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MemoryEventsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CPU_STAT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_STAT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CURRENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAX_FIELD_NUMBER: _ClassVar[int]
    SWAP_CURRENT_FIELD_NUMBER: _ClassVar[int]
    SWAP_MAX_FIELD_NUMBER: _ClassVar[int]
    PIDS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    PIDS_MAX_FIELD_NUMBER: _ClassVar[int]
    cpu_stat: _containers.ScalarMap[str, int]
    memory_stat: _containers.ScalarMap[str, int]
    memory_events: _containers.ScalarMap[str, int]
    memory_current: int
    memory_max: int
    swap_current: int
    swap_max: int
    pids_current: int
    pids_max: int
    def __init__(self, cpu_stat: _Optional[_Mapping[str, int]] = ..., memory_stat: _Optional[_Mapping[str, int]] = ..., memory_events: _Optional[_Mapping[str, int]] = ..., memory_current: _Optional[int] = ..., memory_max: _Optional[int] = ..., swap_current: _Optional[int] = ..., swap_max: _Optional[int] = ..., pids_current: _Optional[int] = ..., pids_max: _Optional[int] = ...) -> None: ...

class UpdateContainerRequest(_message.Message):
    __slots__ = ("container_id", "cpu_max", "cpu_weight", "memory_max", "pids_max", "cpuset_cpus")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    CPU_MAX_FIELD_NUMBER: _ClassVar[int]
    CPU_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAX_FIELD_NUMBER: _ClassVar[int]
    PIDS_MAX_FIELD_NUMBER: _ClassVar[int]
    CPUSET_CPUS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    cpu_max: str
    cpu_weight: int
    memory_max: str
    pids_max: str
    cpuset_cpus: str
    def __init__(self, container_id: _Optional[str] = ..., cpu_max: _Optional[str] = ..., cpu_weight: _Optional[int] = ..., memory_max: _Optional[str] = ..., pids_max: _Optional[str] = ..., cpuset_cpus: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuestDetailsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuestDetails(_message.Message):
    __slots__ = ("protocol_version", "kernel_release", "mem_total_bytes", "boot_id", "agent_started", "agent_ready")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_STARTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_READY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    kernel_release: str
    mem_total_bytes: int
    boot_id: str
    agent_started: float
    agent_ready: float
    def __init__(self, protocol_version: _Optional[int] = ..., kernel_release: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., boot_id: _Optional[str] = ..., agent_started: _Optional[float] = ..., agent_ready: _Optional[float] = ...) -> None: ...

class ConsoleRequest(_message.Message):
    __slots__ = ("console_id", "shell", "rows", "cols", "term")
    CONSOLE_ID_FIELD_NUMBER: _ClassVar[int]
    SHELL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    console_id: str
    shell: str
    rows: int
    cols: int
    term: str
    def __init__(self, console_id: _Optional[str] = ..., shell: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., term: _Optional[str] = ...) -> None: ...

class GuestStatsResponse(_message.Message):
    __slots__ = ("mem_total_bytes", "mem_available_bytes", "load1", "load5", "load15", "containers", "rx_bytes", "tx_bytes")
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    LOAD5_FIELD_NUMBER: _ClassVar[int]
    LOAD15_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    mem_total_bytes: int
    mem_available_bytes: int
    load1: float
    load5: float
    load15: float
    containers: int
    rx_bytes: int
    tx_bytes: int
    def __init__(self, mem_total_bytes: _Optional[int] = ..., mem_available_bytes: _Optional[int] = ..., load1: _Optional[float] = ..., load5: _Optional[float] = ..., load15: _Optional[float] = ..., containers: _Optional[int] = ..., rx_bytes: _Optional[int] = ..., tx_bytes: _Optional[int] = ...) -> None: ...

class User(_message.Message):
    __slots__ = ("uid", "gid", "additional_gids")
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_GIDS_FIELD_NUMBER: _ClassVar[int]
    uid: int
    gid: int
    additional_gids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, uid: _Optional[int] = ..., gid: _Optional[int] = ..., additional_gids: _Optional[_Iterable[int]] = ...) -> None: ...

class Rlimit(_message.Message):
    __slots__ = ("type", "hard", "soft")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HARD_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    type: str
    hard: int
    soft: int
    def __init__(self, type: _Optional[str] = ..., hard: _Optional[int] = ..., soft: _Optional[int] = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ("args", "env", "cwd", "user", "terminal", "rows", "cols", "rlimits", "no_new_privileges", "stdin", "capabilities", "seccomp")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    RLIMITS_FIELD_NUMBER: _ClassVar[int]
    NO_NEW_PRIVILEGES_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SECCOMP_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    user: User
    terminal: bool
    rows: int
    cols: int
    rlimits: _containers.RepeatedCompositeFieldContainer[Rlimit]
    no_new_privileges: bool
    stdin: bool
    capabilities: Capabilities
    seccomp: bytes
    def __init__(self, args: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., terminal: _Optional[bool] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., rlimits: _Optional[_Iterable[_Union[Rlimit, _Mapping]]] = ..., no_new_privileges: _Optional[bool] = ..., stdin: _Optional[bool] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., seccomp: _Optional[bytes] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("bounding", "effective", "inheritable", "permitted", "ambient")
    BOUNDING_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    INHERITABLE_FIELD_NUMBER: _ClassVar[int]
    PERMITTED_FIELD_NUMBER: _ClassVar[int]
    AMBIENT_FIELD_NUMBER: _ClassVar[int]
    bounding: _containers.RepeatedScalarFieldContainer[str]
    effective: _containers.RepeatedScalarFieldContainer[str]
    inheritable: _containers.RepeatedScalarFieldContainer[str]
    permitted: _containers.RepeatedScalarFieldContainer[str]
    ambient: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bounding: _Optional[_Iterable[str]] = ..., effective: _Optional[_Iterable[str]] = ..., inheritable: _Optional[_Iterable[str]] = ..., permitted: _Optional[_Iterable[str]] = ..., ambient: _Optional[_Iterable[str]] = ...) -> None: ...

class Rootfs(_message.Message):
    __slots__ = ("shared_path", "readonly")
    SHARED_PATH_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    shared_path: str
    readonly: bool
    def __init__(self, shared_path: _Optional[str] = ..., readonly: _Optional[bool] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("container_id", "rootfs", "hostname", "process", "mounts", "share_with", "shared_namespaces", "masked_paths", "readonly_paths", "devices", "sysctls")
    class SysctlsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    MOUNTS_FIELD_NUMBER: _ClassVar[int]
    SHARE_WITH_FIELD_NUMBER: _ClassVar[int]
    SHARED_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    MASKED_PATHS_FIELD_NUMBER: _ClassVar[int]
    READONLY_PATHS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    SYSCTLS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    rootfs: Rootfs
    hostname: str
    process: Process
    mounts: _containers.RepeatedCompositeFieldContainer[Mount]
    share_with: str
    shared_namespaces: _containers.RepeatedScalarFieldContainer[str]
    masked_paths: _containers.RepeatedScalarFieldContainer[str]
    readonly_paths: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceRule]
    sysctls: _containers.ScalarMap[str, str]
    def __init__(self, container_id: _Optional[str] = ..., rootfs: _Optional[_Union[Rootfs, _Mapping]] = ..., hostname: _Optional[str] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., mounts: _Optional[_Iterable[_Union[Mount, _Mapping]]] = ..., share_with: _Optional[str] = ..., shared_namespaces: _Optional[_Iterable[str]] = ..., masked_paths: _Optional[_Iterable[str]] = ..., readonly_paths: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[_Union[DeviceRule, _Mapping]]] = ..., sysctls: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeviceRule(_message.Message):
    __slots__ = ("allow", "type", "major", "minor", "access")
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    allow: bool
    type: str
    major: int
    minor: int
    access: str
    def __init__(self, allow: _Optional[bool] = ..., type: _Optional[str] = ..., major: _Optional[int] = ..., minor: _Optional[int] = ..., access: _Optional[str] = ...) -> None: ...

class Mount(_message.Message):
    __slots__ = ("destination", "type", "shared_path", "readonly", "options")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SHARED_PATH_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    destination: str
    type: str
    shared_path: str
    readonly: bool
    options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, destination: _Optional[str] = ..., type: _Optional[str] = ..., shared_path: _Optional[str] = ..., readonly: _Optional[bool] = ..., options: _Optional[_Iterable[str]] = ...) -> None: ...

class ContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "process")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process: Process
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process: _Optional[_Union[Process, _Mapping]] = ...) -> None: ...

class ProcessRef(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ProcessResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class SignalRequest(_message.Message):
    __slots__ = ("process", "signal", "all")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    signal: int
    all: bool
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class WaitResponse(_message.Message):
    __slots__ = ("exit_status", "exited_at")
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    exit_status: int
    exited_at: float
    def __init__(self, exit_status: _Optional[int] = ..., exited_at: _Optional[float] = ...) -> None: ...

class WriteStreamRequest(_message.Message):
    __slots__ = ("process", "data")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    data: bytes
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteStreamResponse(_message.Message):
    __slots__ = ("written",)
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: int
    def __init__(self, written: _Optional[int] = ...) -> None: ...

class ReadStreamRequest(_message.Message):
    __slots__ = ("process", "max_bytes")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    max_bytes: int
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class ReadStreamResponse(_message.Message):
    __slots__ = ("data", "eof")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    eof: bool
    def __init__(self, data: _Optional[bytes] = ..., eof: _Optional[bool] = ...) -> None: ...

class ResizeTtyRequest(_message.Message):
    __slots__ = ("process", "rows", "cols")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    rows: int
    cols: int
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class AdoptRequest(_message.Message):
    __slots__ = ("entropy", "realtime", "hostname", "mount_share")
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    REALTIME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MOUNT_SHARE_FIELD_NUMBER: _ClassVar[int]
    entropy: bytes
    realtime: float
    hostname: str
    mount_share: bool
    def __init__(self, entropy: _Optional[bytes] = ..., realtime: _Optional[float] = ..., hostname: _Optional[str] = ..., mount_share: _Optional[bool] = ...) -> None: ...
