"""The VM layer: QEMU and its command line, QMP, the accelerator, QEMU's user,
the file-sharing helpers (virtiofsd, virtfs-proxy-helper), templates, and the
agent client.  Knows nothing of containers."""
