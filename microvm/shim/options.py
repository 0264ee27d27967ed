"""The runtime options containerd passes with Create (CRI's runtime handler
options: runtimeoptions.v1.Options), read as untrusted input."""

from __future__ import annotations

import tomllib

from google.protobuf import any_pb2

from microvm.protocol import task_pb2


def runtime_options_config(options: any_pb2.Any) -> str | None:
    """The config file named in CRI's runtime options (ConfigPath), if any."""
    opts = task_pb2.RuntimeOptions()
    try:
        opts.ParseFromString(options.value)
    except Exception:
        return None
    if opts.config_path:
        return opts.config_path
    if opts.config_body:
        try:
            table = tomllib.loads(opts.config_body.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            return None
        value = table.get("ConfigPath") or table.get("config_path")
        return str(value) if value else None
    return None
