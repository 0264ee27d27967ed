"""What measures and tests kata-py, kept out of the shipped package: the
benchmark (`scripts/bench`), a private containerd and CRI stack, a local
registry.  Imported by scripts/bench and tests/ from a checkout."""
