"""The output formats, one family per module; importing this package registers all of them in
``mobykit.image.outputs.FORMATS``. LinuxKit's format names and file names are kept."""

from mobykit.image.formats import cloud, convert, initrd, iso, raw, squashfs, tar, tarballs  # noqa: F401
