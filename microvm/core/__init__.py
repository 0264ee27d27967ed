"""The sandbox core: one VM, its helpers, its agent and its containers
(sandbox.py), and what both front ends share: OCI specs, volumes, stdio, the
owner's mount namespace and cgroup."""
