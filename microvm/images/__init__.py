"""Images: the content store, the registry client, safe layer unpacking, OCI
archives, `microvm save`, and the built-in root file systems."""
