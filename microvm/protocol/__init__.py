"""The wire contract between host and guest, imported by both.

Kept free of heavy imports: the guest agent loads it at every boot.
"""

PROTOCOL_VERSION = 12  # 2: ConfigureNetwork; 3: mounts; 4: shared namespaces;
#                        5: capabilities, seccomp, masked and read-only paths;
#                        6: AdoptSandbox (VM templates); 7: sysctls;
#                        8: ConnectPort, ClosePort (port-forward);
#                        9: error reasons (ErrorInfo in the status details),
#                           SignalRequest.all; 10: GuestStats, StartConsole;
#                        11: GetMeasurements (the secure flavour);
#                        12: AdoptSandbox answers with GuestDetails;
#                            Shutdown answers once the guest has synced
AGENT_SERVICE = "katapy.agent.v1.Agent"
# Served by each shim beside containerd's Task API (monitor.proto).
MONITOR_SERVICE = "katapy.monitor.v1.Monitor"
# virtio-serial port name (/sys/class/virtio-ports/*/name in the guest).
SERIAL_PORT_NAME = "kata-py.agent"
# AF_VSOCK port the agent listens on when the transport is vsock.
VSOCK_PORT = 1024
# A static busybox in the guest image: the guest's `ip` and the debug
# console's shell.
GUEST_BUSYBOX = "/bin/busybox"
# containerd's CRI annotation naming a container's pod sandbox.
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# On the guest kernel's command line when the config allows the debug console.
DEBUG_CONSOLE_PARAM = "kata_py.debug_console=1"
# virtio-fs tag of the sandbox's shared directory.
SHARED_FS_TAG = "kata-py-shared"
# Where the guest mounts it.
GUEST_SHARED_ROOT = "/run/kata-py/shared"
# Error reasons (ttrpc.RpcError.reason, an ErrorInfo in the status details),
# from the agent's process calls and the shim's Create, Start and Exec: what
# a status code cannot say alone.  The CLI's 127 and 126 come from these.
REASON_COMMAND_NOT_FOUND = "COMMAND_NOT_FOUND"
REASON_COMMAND_NOT_EXECUTABLE = "COMMAND_NOT_EXECUTABLE"
