"""The `microvm` front end: docker's verbs (commands.py), detached containers
driven through the shim as containerd does, `check`, `install`, `system`."""
