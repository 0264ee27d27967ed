"""The containerd front end: containerd-shim-kata-py-v2 (manager.py), the
Task API over the sandbox core (task_service.py), and task events."""
