"""What disk and ISO formats share: running Debian's tools (``tools``), ids derived from the image
id (``ids``), FAT images (``fat``) and GRUB EFI loaders (``grub``). Written once here so no format
module carries its own copy of a partition table or a file system."""
