"""kata-py: every container in its own QEMU microVM."""

__version__ = "0.1.0"
