"""The image spec: LinuxKit's YAML (and the 2017 Moby form) loaded with file:line errors,
validated against a JSON schema before anything is fetched, merged as LinuxKit merges several
files, and turned into OCI bundle configs by ``mobykit.spec.oci``."""

from mobykit.spec.load import SpecSource, load, loads
from mobykit.spec.model import FileEntry, ImageEntry, Kernel, Spec

__all__ = ["SpecSource", "load", "loads", "Spec", "Kernel", "ImageEntry", "FileEntry"]
